"""RETRO (Borgeaud et al., 2022): a decoder with chunked cross-attention to encoded retrieved neighbours.

Written here because no maintained library ships RETRO as a transformers model; RETRO-pytorch is the
reference for the layout. A `PretrainedConfig` / `PreTrainedModel` pair registered with the Auto classes,
so checkpoints open with `AutoModel.from_pretrained` once ragkit is imported.

Shapes: input_ids (B, N) with N a multiple of `chunk_size` m; retrieved (B, C, K, R): for each of the
C = N / m chunks, K neighbours of R tokens (neighbour chunk + its continuation, R = 2m by default).

Causality: the neighbours of chunk j were retrieved with chunk j's text, so only positions that have seen
the whole chunk may attend to them. Position t attends to the neighbours of chunk floor((t + 1) / m) - 1
(none for t < m - 1): the hidden states are shifted by m - 1 before being cut into chunks, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class RetroConfig(PretrainedConfig):
    model_type = "ragkit-retro"

    def __init__(self, vocab_size: int = 49152, dim: int = 512, dec_depth: int = 6, enc_depth: int = 2,
                 heads: int = 8, dim_head: int = 64, chunk_size: int = 64, num_neighbors: int = 2,
                 neighbor_len: int | None = None, cross_attn_layers: list[int] | None = None, ff_mult: int = 4,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0, deepnet: bool = False,
                 pad_token_id: int = 0, enc_dim: int | None = None, **kwargs: Any) -> None:
        self.vocab_size, self.dim, self.dec_depth, self.enc_depth = vocab_size, dim, dec_depth, enc_depth
        self.enc_dim = enc_dim or dim  # the neighbour encoder's width (RETRO-pytorch's enc_dim; dim is dec_dim)
        self.heads, self.dim_head, self.chunk_size, self.num_neighbors = heads, dim_head, chunk_size, num_neighbors
        self.neighbor_len = neighbor_len or 2 * chunk_size
        # RETRO-pytorch's default: every third layer from the third on (layers are 1-indexed there)
        self.cross_attn_layers = list(cross_attn_layers) if cross_attn_layers is not None else list(range(2, dec_depth, 3))
        wrong = [i for i in self.cross_attn_layers if not 0 <= i < dec_depth]
        if wrong:  # a layer that does not exist would silently give a model with fewer CCA layers than asked
            raise ValueError(f"cross_attn_layers {wrong}: decoder layers are 0-indexed and below dec_depth {dec_depth}")
        self.ff_mult, self.attn_dropout, self.ff_dropout, self.deepnet = ff_mult, attn_dropout, ff_dropout, deepnet
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @classmethod
    def from_retro_pytorch(cls, **kwargs: Any) -> "RetroConfig":
        """A config from RETRO-pytorch's `RETRO(...)` arguments, so ported code keeps its numbers:
        `dec_cross_attn_layers` are 1-indexed there (converted), `max_seq_len` is not needed (rotary
        positions), and arguments with no equivalent here are refused, never dropped."""
        names = {"num_tokens": "vocab_size", "dec_dim": "dim", "enc_dim": "enc_dim", "dec_depth": "dec_depth",
                 "enc_depth": "enc_depth", "heads": "heads", "dim_head": "dim_head", "chunk_size": "chunk_size",
                 "dec_attn_dropout": "attn_dropout", "dec_ff_dropout": "ff_dropout", "use_deepnet": "deepnet",
                 "pad_id": "pad_token_id"}
        ignored = {"max_seq_len"}
        unknown = sorted(set(kwargs) - set(names) - ignored - {"dec_cross_attn_layers"})
        if unknown:
            raise ValueError(f"RETRO-pytorch arguments with no equivalent in ragkit's RETRO: {', '.join(unknown)}")
        out = {names[k]: v for k, v in kwargs.items() if k in names}
        out.setdefault("dim", 896)  # RETRO-pytorch's defaults where ragkit's differ
        out.setdefault("enc_dim", 896)
        out.setdefault("dec_depth", 12)
        if "dec_cross_attn_layers" in kwargs:
            out["cross_attn_layers"] = [int(i) - 1 for i in kwargs["dec_cross_attn_layers"]]
        else:
            out["cross_attn_layers"] = [i - 1 for i in range(1, out["dec_depth"] + 1) if i % 3 == 0]
        return cls(**out)


def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on (..., T, d) with integer positions (T,)."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head attention over SDPA: self-attention (optionally causal) or cross-attention to a context."""

    def __init__(self, config: RetroConfig, *, causal: bool = False, dim: int | None = None,
                 context_dim: int | None = None) -> None:
        super().__init__()
        inner = config.heads * config.dim_head
        dim = dim or config.dim
        self.heads, self.causal, self.dropout = config.heads, causal, config.attn_dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, rotate: bool = True,
                context_mask: torch.Tensor | None = None, cache: "KVCache | None" = None) -> torch.Tensor:
        """With `cache` (causal self-attention only), x holds the tokens after the cached ones: their keys and
        values are appended to the cache and they attend to everything up to themselves."""
        b, t, _ = x.shape
        source = x if context is None else context
        q = self.to_q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(source).view(b, source.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        past = cache.length if cache is not None else 0
        if rotate:
            q = rotary(q, torch.arange(past, past + t, device=x.device))
            k = rotary(k, torch.arange(past, past + source.shape[1], device=x.device))
        if cache is not None:
            k, v = cache.append(k, v)
        mask = None
        if context_mask is not None:
            mask = context_mask[:, None, None, :]
        causal = self.causal and context is None
        if causal and past and t > 1:  # new block against cache + itself: query i sees keys <= past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and t > 1,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class KVCache:
    """Keys and values of one self-attention layer for the tokens decoded so far."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        return self.keys, self.values


class FeedForward(nn.Sequential):
    def __init__(self, config: RetroConfig, dim: int | None = None) -> None:
        dim = dim or config.dim
        super().__init__(nn.Linear(dim, dim * config.ff_mult), nn.GELU(), nn.Dropout(config.ff_dropout),
                         nn.Linear(dim * config.ff_mult, dim))


class Residual(nn.Module):
    """Pre-norm residual; with DeepNet, x * alpha + f(norm(x)) (Wang et al., 2022)."""

    def __init__(self, config: RetroConfig, fn: nn.Module, alpha: float, dim: int | None = None) -> None:
        super().__init__()
        self.norm, self.fn, self.alpha = nn.RMSNorm(dim or config.dim), fn, alpha

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x * self.alpha + self.fn(self.norm(x), *args, **kwargs)


@dataclass
class DecodingState:
    """What incremental decoding keeps between calls: per-layer key/value caches, the hidden states that
    condition the neighbour encoder (input of the first CCA layer, every position so far), and each
    completed chunk's encoded neighbours."""

    caches: list[KVCache]
    chunk_states: torch.Tensor | None = None  # (B, T, D)
    encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # chunk -> (B, K*R, D), mask

    @property
    def length(self) -> int:
        return self.caches[0].length


class ChunkedCrossAttention(nn.Module):
    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.chunk = config.chunk_size
        self.attn = Attention(config, context_dim=config.enc_dim)  # decoder queries, encoded neighbours

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor, neighbour_mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, D); neighbours (B, C, K*R, E) encoded (E: enc_dim); neighbour_mask (B, C, K*R)."""
        b, n, d = x.shape
        m, c = self.chunk, neighbours.shape[1]
        shift = m - 1
        shifted = F.pad(x[:, shift:], (0, 0, 0, shift))  # position t lands in group floor((t + 1) / m) - 1
        groups = shifted.reshape(b * c, m, d)
        out = self.attn(groups, neighbours.reshape(b * c, -1, neighbours.shape[-1]), rotate=False,
                        context_mask=neighbour_mask.reshape(b * c, -1))
        out = out.reshape(b, n, d)
        return F.pad(out, (0, 0, shift, 0))[:, :n]  # positions t < m - 1 attend to nothing

    def forward_span(self, x: torch.Tensor, start: int, encoded: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The same attention for positions start .. start + T - 1 only (incremental decoding): each position
        attends to the encoded neighbours of chunk (t + 1) // m - 1; positions whose chunk has none in
        `encoded` (or t < m - 1) read nothing, as in `forward`."""
        out = torch.zeros_like(x)
        groups = [(t + 1) // self.chunk - 1 for t in range(start, start + x.shape[1])]
        for g in sorted(set(groups)):
            if g not in encoded:  # also every g < 0
                continue
            cols = [i for i, gi in enumerate(groups) if gi == g]
            lo, hi = cols[0], cols[-1] + 1
            neighbours, mask = encoded[g]
            out[:, lo:hi] = self.attn(x[:, lo:hi], neighbours, rotate=False, context_mask=mask)
        return out


class RetroEncoder(nn.Module):
    """Encodes each neighbour (self-attention), conditioned by cross-attention on the decoder's hidden states
    of the chunk that retrieved it."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        alpha = (2 * config.enc_depth) ** 0.25 if config.deepnet else 1.0
        e = config.enc_dim
        self.layers = nn.ModuleList(nn.ModuleList([
            Residual(config, Attention(config, dim=e), alpha, dim=e),
            Residual(config, Attention(config, dim=e, context_dim=config.dim), alpha, dim=e),
            Residual(config, FeedForward(config, dim=e), alpha, dim=e)]) for _ in range(config.enc_depth))
        self.norm = nn.RMSNorm(e)

    def forward(self, neighbours: torch.Tensor, chunk_states: torch.Tensor) -> torch.Tensor:
        """neighbours (B*C*K, R, E); chunk_states (B*C*K, m, D): the encoder runs at enc_dim E and reads the
        decoder's states at its width D."""
        x = neighbours
        for self_attn, cross_attn, ff in self.layers:
            x = self_attn(x)
            x = cross_attn(x, chunk_states, rotate=False)
            x = ff(x)
        return self.norm(x)


class RetroModel(PreTrainedModel):
    config_class = RetroConfig
    base_model_prefix = "retro"
    supports_gradient_checkpointing = False

    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        alpha = (2 * config.dec_depth) ** 0.25 if config.deepnet else 1.0
        self.layers = nn.ModuleList()
        for i in range(config.dec_depth):
            block = nn.ModuleDict({"self_attn": Residual(config, Attention(config, causal=True), alpha),
                                   "ff": Residual(config, FeedForward(config), alpha)})
            if i in config.cross_attn_layers:
                block["cca"] = Residual(config, ChunkedCrossAttention(config), alpha)
            self.layers.append(block)
        self.encoder = RetroEncoder(config) if config.cross_attn_layers else None  # none: a decoder-only baseline
        # one token table at the decoder's width; neighbours are projected to the encoder's (RETRO-pytorch
        # keeps its table at enc_dim and projects the other way: same model family, a few weights apart)
        self.to_encoder_dim = (nn.Linear(config.dim, config.enc_dim, bias=False)
                               if config.enc_dim != config.dim and config.cross_attn_layers else None)
        self.norm = nn.RMSNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # DeepNet: residual branches start small (gain (8 N)^(-1/4)), so the alpha-scaled stack stays stable
            gain = (8 * self.config.dec_depth) ** -0.25 if self.config.deepnet else 1.0
            nn.init.xavier_normal_(module.weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, retrieved: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, return_loss: bool | None = None,
                mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Hugging Face style: `labels` (= input_ids, shifted here) give `CausalLMOutput.loss`.
        RETRO-pytorch style: `return_loss=True` takes a sequence one token longer than its chunks cover,
        splits it into inputs and targets and returns the loss tensor (padding, pad_token_id, ignored);
        `return_loss=False` returns the logits tensor. `retrieved` (B, C, K, R), or (B, C, R) for one
        neighbour; `mask` (same shape, True = a real token) narrows which neighbour tokens are read."""
        unknown = set(kwargs) - {"num_items_in_batch", "return_dict"}  # what transformers.Trainer may pass
        if unknown:
            raise TypeError(f"RetroModel.forward() got unexpected arguments: {', '.join(sorted(unknown))}")
        if retrieved is not None and retrieved.ndim == 3:
            retrieved = retrieved.unsqueeze(2)
            mask = mask.unsqueeze(2) if mask is not None and mask.ndim == 3 else mask
        if return_loss:
            if labels is not None:
                raise ValueError("give labels or return_loss=True (which takes the targets from the sequence), not both")
            input_ids, targets = input_ids[:, :-1], input_ids[:, 1:]
            logits = self._logits(input_ids, retrieved, mask)
            ignore = self.config.pad_token_id if self.config.pad_token_id is not None else -100
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore)
        logits = self._logits(input_ids, retrieved, mask)
        if return_loss is False:
            return logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def _logits(self, input_ids: torch.Tensor, retrieved: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        b, n = input_ids.shape
        if n % cfg.chunk_size:
            raise ValueError(f"sequence length {n} is not a multiple of chunk_size {cfg.chunk_size}")
        x = self.embed(input_ids)
        encoded = token_mask = None
        for block in self.layers:
            x = block["self_attn"](x)
            if "cca" in block and retrieved is not None:
                if encoded is None:  # neighbours encoded once, conditioned on the first CCA layer's input
                    encoded, token_mask = self._encode(retrieved, x, mask)
                x = block["cca"](x, encoded, token_mask)
            x = block["ff"](x)
        return self.lm_head(self.norm(x))

    def _encode(self, retrieved: torch.Tensor, x: torch.Tensor,
                given_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        b, n, d = x.shape
        c = n // cfg.chunk_size
        if retrieved.shape[:2] != (b, c):
            raise ValueError(f"retrieved has shape {tuple(retrieved.shape)}; expected ({b}, {c}, K, R)")
        k, r = retrieved.shape[2], retrieved.shape[3]
        chunk_states = x.reshape(b, c, cfg.chunk_size, d).repeat_interleave(k, dim=1).reshape(b * c * k, cfg.chunk_size, d)
        embedded = self.embed(retrieved.clamp(min=0).reshape(b * c * k, r))
        if self.to_encoder_dim is not None:
            embedded = self.to_encoder_dim(embedded)
        neighbours = self.encoder(embedded, chunk_states)
        mask = neighbour_token_mask(retrieved, cfg.pad_token_id)
        if given_mask is not None:
            if given_mask.shape != retrieved.shape:
                raise ValueError(f"mask has shape {tuple(given_mask.shape)}; retrieved has {tuple(retrieved.shape)}")
            mask = mask & given_mask.bool()
        mask = mask.reshape(b, c, k * r)
        # a chunk with no neighbour at all would make softmax over an empty set: let it see one padded slot
        mask[..., 0] |= ~mask.any(-1)
        return neighbours.reshape(b, c, k * r, -1), mask

    # -- incremental decoding ---------------------------------------------------------------------
    def new_state(self) -> DecodingState:
        return DecodingState(caches=[KVCache() for _ in self.layers])

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, state: DecodingState,
                       retrieved: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, T, V) for the T tokens that follow the `state.length` already decoded ones, reusing
        their cached keys and values. `retrieved` maps each chunk completed by these tokens to its
        neighbours (B, K, R); they are encoded once, at the first CCA layer, and kept in `state`. A
        completed chunk without neighbours is read as nothing (as the whole model does with retrieved=None)."""
        m = self.config.chunk_size
        start = state.length
        x = self.embed(input_ids)
        encoded_now = False
        for block, cache in zip(self.layers, state.caches):
            x = block["self_attn"](x, cache=cache)
            if "cca" in block:
                if not encoded_now:  # the first CCA layer: remember its input, encode new chunks' neighbours
                    state.chunk_states = x if state.chunk_states is None else torch.cat([state.chunk_states, x], 1)
                    for c, tokens in sorted((retrieved or {}).items()):
                        chunk = state.chunk_states[:, c * m:(c + 1) * m]
                        if chunk.shape[1] < m:
                            raise ValueError(f"neighbours given for chunk {c}, which is not complete yet")
                        encoded, mask = self._encode(tokens[:, None], chunk.contiguous())
                        state.encoded[c] = (encoded[:, 0], mask[:, 0])
                    encoded_now = True
                cca = block["cca"]
                x = x * cca.alpha + cca.fn.forward_span(cca.norm(x), start, state.encoded)
            x = block["ff"](x)
        return self.lm_head(self.norm(x))


def neighbour_token_mask(retrieved: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """True for real neighbour tokens: negative ids (the pipeline's padding) and `pad_token_id` are not."""
    mask = retrieved.ge(0)
    if pad_token_id is not None and pad_token_id >= 0:
        mask &= retrieved.ne(pad_token_id)
    return mask


def register_auto() -> None:
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(RetroConfig.model_type, RetroConfig)
        AutoModel.register(RetroConfig, RetroModel)
    except ValueError:  # already registered
        pass


register_auto()

__all__ = ["RetroConfig", "RetroModel"]
