"""Encoder: text -> vectors with a Hugging Face model.

Batches are packed by a token budget after sorting by length, so almost no compute goes to
padding, and every row's vector is independent of which rows share its batch (beyond float noise).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from semvec.config import DType, Pooling
from semvec.models import ModelKind, load_options, model_defaults, model_kind
from semvec.precision import resolve as resolve_dtype
from semvec.tokens import Tokenized, load_tokenizer, tokenize

log = logging.getLogger(__name__)

# dtype -> (weights, autocast dtype or None)
_TORCH_DTYPES = {
    DType.FLOAT32: (torch.float32, None),
    DType.FLOAT16: (torch.float16, None),
    DType.BFLOAT16: (torch.bfloat16, None),
    DType.BFLOAT16_MIXED: (torch.float32, torch.bfloat16),
}


# (padded tokens, rows) per forward pass. On CPU, bfloat16 matrix products gain from larger
# batches and float32 ones do not (measured, benchmarks/RESULTS.md).
CPU_BATCH = (1024, 32)  # float32
CPU_BATCH_REDUCED = (2048, 32)  # float16, bfloat16, bfloat16-mixed
GPU_BATCH = (16384, 512)


def pack(lengths: np.ndarray, batch_tokens: int, max_rows: int = 256) -> list[np.ndarray]:
    """Group row indices into batches, longest first, each under a padded-token budget.

    Sorting first means each batch pads to nearly its own length; the budget keeps memory flat
    whether rows are 5 tokens or 512.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_rows, batch_tokens // longest))
        batches.append(order[start:start + size])
        start += size
    return batches


def padded(ids: list, lengths: np.ndarray, batch: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, attention mask), int64 [len(batch), longest]: the rows `batch` of `ids`, padded."""
    width = int(lengths[batch].max())
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for j, i in enumerate(batch):
        input_ids[j, : lengths[i]] = ids[i]
        mask[j, : lengths[i]] = 1
    return input_ids, mask


class Encoder:
    """A loaded model plus the pooling rules for it. Build one per worker, reuse it.

    A static model (its card's kind) loads a token table instead (semvec.static): no forward
    pass, on the CPU unless a device is given, dtype and batch size unused."""

    def __init__(
        self,
        model_dir: Path,
        pooling: Pooling | str = Pooling.AUTO,
        normalize: bool | None = None,
        max_length: int | None = None,
        dtype: DType | str = DType.AUTO,
        device: str | None = None,
        batch_tokens: int | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModel

        defaults = model_defaults(model_dir)
        pooling = Pooling(pooling)
        self.pooling = Pooling(defaults.pooling) if pooling == Pooling.AUTO else pooling
        self.normalize = defaults.normalize if normalize is None else normalize
        self.max_length = max_length or defaults.max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype, self.dtype_reason = resolve_dtype(dtype, self.device.type)
        self.dtype = dtype
        if self.device.type == "cuda":
            default_tokens, self.max_rows = GPU_BATCH
        else:
            default_tokens, self.max_rows = CPU_BATCH if dtype == DType.FLOAT32 else CPU_BATCH_REDUCED
        self.batch_tokens = batch_tokens or default_tokens
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.static = None
        if model_kind(Path(model_dir)) == ModelKind.STATIC:
            from semvec.static import StaticTable

            self.device = torch.device(device or "cpu")  # a lookup: moving rows to a GPU costs more
            self.static = StaticTable.load(Path(model_dir)).to(self.device)
            self.model, self.extras, self.dim, self.autocast = None, None, self.static.dim, None
            return
        weights, self.autocast = _TORCH_DTYPES[dtype]
        self.model = AutoModel.from_pretrained(
            str(model_dir),
            dtype=weights,
            trust_remote_code=trust_remote_code,
            **load_options(),
        ).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.extras = _method_extras(model_dir, self.model)
        mapped = mapped_weights(self.model) if log.isEnabledFor(logging.DEBUG) else None
        if mapped is not None:
            log.debug("weights: %.1f of %.1f MB read in place from the memory-mapped model files "
                     "(one copy per node, shared by its actors; the rest is this process's own)",
                     mapped[0] / 1e6, mapped[1] / 1e6)

    def tokenize(self, texts: list[str], with_offsets: bool = False) -> Tokenized:
        return tokenize(self.tokenizer, texts, self.max_length, with_offsets)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """float32 [n, dim] sentence vectors for a list of strings."""
        return self.encode_ids(self.tokenize(texts).ids)[0]

    @torch.inference_mode()
    def encode_ids(
        self, ids: list[np.ndarray], with_tokens: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Sentence vectors float32 [n, dim]; with_tokens adds float32 [n_tokens_i, dim] per row."""
        if self.static is not None:
            return self.static.encode(ids, self.pooling, self.normalize, with_tokens)
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        tokens: list[np.ndarray | None] | None = [None] * n if with_tokens else None
        if n == 0:
            return out, tokens
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            self._encode_packed(ids, lengths, out, tokens)
        return out, tokens

    def _encode_packed(self, ids, lengths, out: np.ndarray, tokens: list | None) -> None:
        # One autocast region around all batches: its cast of the weights is made once, not per batch.
        # On a GPU the loop runs one batch ahead: batch i's vectors are read only after batch i+1 is
        # padded and pinned on the CPU and queued, so that CPU work overlaps batch i's compute. The
        # copies (non-blocking, from and to pinned memory) run on the compute stream, so they do not
        # overlap compute themselves; and transformers' mask code may wait for the GPU inside a
        # forward pass. On a CPU every step is synchronous (the same order).
        cuda = self.device.type == "cuda"
        pending = None
        for batch in pack(lengths, self.batch_tokens, self.max_rows):
            input_ids, mask = padded(ids, lengths, batch, self.pad_id)
            flight = self._launch(torch.from_numpy(input_ids), torch.from_numpy(mask),
                                  with_tokens=tokens is not None, cuda=cuda)
            if pending is not None:
                self._collect(*pending, lengths, out, tokens)
            pending = (batch, *flight)
        if pending is not None:
            self._collect(*pending, lengths, out, tokens)

    def _launch(self, input_ids: torch.Tensor, mask: torch.Tensor, with_tokens: bool, cuda: bool):
        """Queue one batch: (pooled [b, d], hidden [b, t, d] or None, an event marking when both are
        on the host, or None when they already are)."""
        if cuda:
            input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
            mask_dev = mask.pin_memory().to(self.device, non_blocking=True)
        else:
            input_ids, mask_dev = input_ids.to(self.device), mask.to(self.device)
        hidden, pooled = self._forward(input_ids, mask_dev, with_tokens)
        if not cuda:
            return pooled.cpu().numpy(), None if hidden is None else hidden.cpu().numpy(), None
        pooled = pooled.to("cpu", non_blocking=True)  # pinned host memory, read after the event
        hidden = None if hidden is None else hidden.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return pooled, hidden, done

    @staticmethod
    def _collect(batch, pooled, hidden, done, lengths, out: np.ndarray, tokens: list | None) -> None:
        if done is not None:
            done.synchronize()
            pooled, hidden = pooled.numpy(), None if hidden is None else hidden.numpy()
        out[batch] = pooled
        if tokens is not None:
            for j, i in enumerate(batch):
                # from a GPU, a copy: a view would keep the whole padded, page-locked batch alive
                tokens[i] = hidden[j, : lengths[i]] if done is None else hidden[j, : lengths[i]].copy()

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor,
                 with_tokens: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(per-token vectors float32 [b, t, d] when with_tokens, else None; pooled vectors float32
        [b, d]) on the model's device, normalised when the model normalises."""
        if self.extras is not None:  # adapters or a learned prompt that could not be merged
            hidden, _ = self.extras(input_ids, mask)
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [b, t, d]
        hidden = hidden.float()
        pooled = pool(hidden, mask, self.pooling)  # [b, d]
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        if not with_tokens:
            return None, pooled
        if self.normalize:
            hidden = torch.nn.functional.normalize(hidden, p=2, dim=-1)
        return hidden, pooled


def mapped_weights(model: torch.nn.Module) -> tuple[int, int] | None:
    """(bytes of the model's parameters that lie in a memory-mapped .safetensors file, all their
    bytes); None where the process's mappings cannot be read (not Linux).

    transformers maps safetensors files and, when the file's dtype is the one asked for and the
    device is the CPU, leaves parameters in place in that mapping: the operating system then holds
    one copy of the weights per node, whatever the number of actors there (float32 weights, under
    bfloat16 autocast too). A cast (pinned float16 or bfloat16) or a GPU makes a copy per actor."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            spans = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                     for line in f if line.rstrip().endswith(".safetensors")]
    except OSError:
        return None
    inside = total = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        total += size
        if p.device.type == "cpu" and any(a <= p.data_ptr() < b for a, b in spans):
            inside += size
    return inside, total


def _method_extras(model_dir: Path, model):
    """A model fine-tuned with adapters or prompt tuning carries extra weights beside the base
    model (its card says which); every other model runs as it is."""
    from semvec.extras import has_extras, load_extras
    from semvec.models import read_card

    card = read_card(Path(model_dir))
    if card is None or not has_extras(card.method):
        return None
    return load_extras(Path(model_dir), model, card.method).to(next(model.parameters()).device)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden [b, t, d], mask [b, t] (1 = token, right padded) -> [b, d]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
    if pooling == Pooling.MEAN:
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == Pooling.CLS:
        return hidden[:, 0]
    if pooling == Pooling.MAX:
        return hidden.masked_fill(m == 0, float("-inf")).max(1).values
    if pooling == Pooling.LAST:
        last = mask.sum(1).long() - 1  # [b]: index of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling {pooling!r} must be resolved before encoding")
