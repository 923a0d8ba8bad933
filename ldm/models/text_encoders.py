"""Text encoders behind one call, `encode(list[str]) -> TextEmbeddings`: CLIP, OpenCLIP, T5 and a small one."""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.models.attention import attention
from ldm.models.openclip_text import OpenCLIPTextTower, fits_tower
from ldm.models.tokenizers import BPETokenizer, ByteTokenizer, clip_tokenizer, load_tokenizer

# SD-1's text encoder: OpenAI CLIP ViT-L/14's text tower (Radford et al. 2021), as transformers' CLIPTextConfig.
SD1_CLIP_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def check_clip_skip_value(clip_skip) -> None:
    """A clip_skip setting is None (the model's own layer) or an integer >= 0 (0 is the model's own layer too)."""
    if clip_skip is None:
        return
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise LdmError(f"--clip-skip must be a whole number of layers (0 or more), got {clip_skip!r}")
    if clip_skip < 0:
        raise LdmError(f"--clip-skip {clip_skip} is negative: it counts the last layers of the text encoder left "
                       "out (0 = none; A1111's 'Clip skip 2' is clip_skip 1)")


def _layers(n: int) -> str:
    return f"{n} layer" + ("s" if n != 1 else "")


def skipped_layers(layer: str, clip_skip: int = 0) -> int:
    """Transformer blocks left out at the end of a CLIP tower: the model's own (`penultimate`: 1) plus clip_skip.

    diffusers' SD-2 folders drop OpenCLIP's last block, so their `clip_skip` counts on from the penultimate layer;
    ldm reads SD-2 at `layer: penultimate` and adds clip_skip to it, which gives diffusers' tokens for the same
    weights in either format."""
    return (1 if layer == "penultimate" else 0) + clip_skip


@dataclass
class TextEmbeddings:
    """Per-token features `b n d`, pooled features `b d` (or None), and the `b n` bool mask of positions to attend."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor


class TextEncoder(nn.Module):
    """Base class: `encode(prompts)`; a frozen encoder stays in eval mode, has no trainable parameters, runs no_grad."""

    max_length: int
    dim: int
    pooled_dim: int | None

    def __init__(self, freeze: bool = True):
        super().__init__()
        self.frozen = freeze

    def _apply_freeze(self) -> None:
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Frozen encoders ignore train(): dropout stays off, like CompVis' `disabled_train`."""
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, prompts: list[str], clip_skip: int | None = None) -> TextEmbeddings:
        """Encode a batch of prompts ("" allowed); over-long prompts are truncated with a warning.

        `clip_skip` (CLIP and OpenCLIP towers only; None or 0: the model's own layer) reads the tokens that many
        transformer blocks earlier, diffusers' `clip_skip` (docs/clip-skip.md)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check_clip_skip(clip_skip)
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            if clip_skip:
                return self._encode(list(prompts), clip_skip=clip_skip)
            return self._encode(list(prompts))

    def forward(self, prompts: list[str], clip_skip: int | None = None) -> TextEmbeddings:
        return self.encode(prompts, clip_skip)

    def max_clip_skip(self) -> int | None:
        """The largest `clip_skip` this encoder takes (one transformer block must remain); None where clip_skip has
        no meaning (T5, the small byte-level encoder)."""
        return None

    def check_clip_skip(self, clip_skip) -> None:
        """Refuse a clip_skip this encoder cannot take: not an integer >= 0, past its first block, or any value for
        an encoder that is not CLIP's."""
        check_clip_skip_value(clip_skip)
        if clip_skip is None:
            return
        limit = self.max_clip_skip()
        if limit is None:
            raise LdmError(f"--clip-skip {clip_skip}: clip_skip reads an earlier layer of a CLIP text encoder (SD-1, "
                           f"SD-2, SDXL); this model's text encoder is {type(self).__name__}, for which it has no "
                           "meaning: leave --clip-skip out")
        if clip_skip > limit:
            raise LdmError(f"--clip-skip {clip_skip} is more than this model's {type(self).__name__} can skip: "
                           f"{self._layers_note()}, so clip_skip is at most {limit}")

    def _layers_note(self) -> str:
        return ""

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        raise NotImplementedError

    def _warn_truncated(self, prompt: str, dropped: str) -> None:
        start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        dropped = dropped.strip()
        # a pasted paragraph would fill the screen: its start and its length say enough
        more = f" ... and {len(dropped) - 200} more characters" if len(dropped) > 200 else ""
        warnings.warn(f"{type(self).__name__}: prompt {start!r} is longer than {self.max_length} tokens; "
                      f"the dropped words are: {dropped[:200]!r}{more}", stacklevel=4)


class _CLIPLayers(TextEncoder):
    """A CLIP-style tower of `num_layers` blocks read at `layer` ("last" | "penultimate"): what clip_skip may skip."""

    layer: str
    num_layers: int

    def max_clip_skip(self) -> int:
        return self.num_layers - 1 - skipped_layers(self.layer)

    def _layers_note(self) -> str:
        own = " and reads the penultimate one (layer: penultimate)" if self.layer == "penultimate" else ""
        return f"it has {_layers(self.num_layers)}{own}"


class _TextModelKeys(nn.Module):
    """Holds a transformers >= 5 `CLIPTextModel` at `.text_model`: keys read `text_model.*` as in SD-1 checkpoints."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model
        self.register_load_state_dict_pre_hook(self._drop_position_ids)

    @staticmethod
    def _drop_position_ids(module, state_dict, prefix, *args) -> None:
        # SD-1 checkpoints saved with transformers 4 carry this buffer; transformers 5 no longer persists it.
        state_dict.pop(prefix + "text_model.embeddings.position_ids", None)

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


class CLIPTextEncoder(_CLIPLayers):
    """transformers `CLIPTextModel` (SD-1, or diffusers' SD-2 export); padded to max_length as diffusers' pipelines."""

    def __init__(self, model: nn.Module, tokenizer: Any, layer: str = "last", max_length: int | None = None,
                 freeze: bool = True):
        super().__init__(freeze)
        if layer not in ("last", "penultimate"):
            raise ConfigError(f"CLIPTextEncoder layer must be 'last' or 'penultimate', got {layer!r}")
        # transformers 4's CLIPTextModel already holds `.text_model`; transformers 5's is the text model itself.
        self.transformer = model if hasattr(model, "text_model") else _TextModelKeys(model)
        self.tokenizer, self.layer = tokenizer, layer
        positions = model.config.max_position_embeddings
        self.max_length = min(max_length or tokenizer.model_max_length, positions)
        self.dim = self.pooled_dim = model.config.hidden_size
        self._apply_freeze()

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped transformers `CLIPTextModel`."""
        return self.transformer.text_model if isinstance(self.transformer, _TextModelKeys) else self.transformer

    @property
    def num_layers(self) -> int:
        """The tower's transformer blocks."""
        return self.hf_model.config.num_hidden_layers

    def _encode(self, prompts: list[str], clip_skip: int = 0) -> TextEmbeddings:
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            if len(ids) > self.max_length - 2:  # room for <start> and <end>
                self._warn_truncated(prompt, self.tokenizer.decode(ids[self.max_length - 2:]))
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        skip = skipped_layers(self.layer, clip_skip)
        out = self.hf_model(ids, output_hidden_states=skip > 0)
        tokens = out.last_hidden_state
        if skip:  # diffusers' clip_skip: `skip` blocks before the last one's output, then the final LayerNorm
            # (hidden_states[0] is the embedding layer's output, hidden_states[-1] the last block's)
            tokens = getattr(self.hf_model, "text_model", self.hf_model).final_layer_norm(out.hidden_states[-1 - skip])
        # SD's U-Net attends to all max_length positions, padding included: the mask is all True.
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        return TextEmbeddings(tokens, out.pooler_output, mask)


class OpenCLIPTextEncoder(_CLIPLayers):
    """open_clip text tower (SD-2's FrozenOpenCLIPEmbedder) at `.model`; "penultimate" skips the last block.

    `model` is ldm's `OpenCLIPTextTower` or an open_clip `CLIP` (same keys); the tokenizer is ldm's `BPETokenizer`,
    which gives open_clip's ids.
    """

    def __init__(self, model: nn.Module, layer: str = "penultimate", max_length: int | None = None,
                 freeze: bool = True):
        super().__init__(freeze)
        if layer not in ("last", "penultimate"):
            raise ConfigError(f"OpenCLIPTextEncoder layer must be 'last' or 'penultimate', got {layer!r}")
        if hasattr(model, "visual"):
            del model.visual  # only the text tower is used
        self.model, self.layer = model, layer
        self.max_length = min(max_length or model.context_length, model.context_length)
        self.tokenizer = BPETokenizer(context_length=self.max_length)
        self.dim = model.token_embedding.weight.shape[1]
        proj = model.text_projection
        self.pooled_dim = self.dim if proj is None else (proj.out_features if isinstance(proj, nn.Linear)
                                                         else proj.shape[1])
        self._apply_freeze()

    def _blocks(self, x: torch.Tensor, blocks) -> torch.Tensor:
        batch_first = getattr(self.model.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        mask = self.model.attn_mask[:self.max_length, :self.max_length]
        for block in blocks:
            x = block(x, attn_mask=mask)
        return x if batch_first else x.transpose(0, 1)

    @property
    def num_layers(self) -> int:
        """The tower's transformer blocks (a diffusers SD-2 folder's 23, plus the identity block put in place of the
        dropped 24th)."""
        return len(self.model.transformer.resblocks)

    def _encode(self, prompts: list[str], clip_skip: int = 0) -> TextEmbeddings:
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt)
            if len(ids) > self.max_length - 2:
                self._warn_truncated(prompt, self.tokenizer.decode(ids[self.max_length - 2:]))
        ids = self.tokenizer(prompts).to(self.device)
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding[:self.max_length]
        blocks = m.transformer.resblocks
        skip = skipped_layers(self.layer, clip_skip)
        if skip:  # the tokens `skip` blocks before the end, through ln_final; pooled from the last block as ever
            x = self._blocks(x, blocks[:-skip])
            tokens = m.ln_final(x)
            last = m.ln_final(self._blocks(x, blocks[-skip:]))
        else:
            tokens = last = m.ln_final(self._blocks(x, blocks))
        # Pooled as open_clip's encode_text: the end-of-text token (the largest id) of the last layer, projected.
        pooled = last[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        if isinstance(m.text_projection, nn.Linear):
            pooled = m.text_projection(pooled)
        elif m.text_projection is not None:
            pooled = pooled @ m.text_projection
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)  # SD-2 attends to all positions
        return TextEmbeddings(tokens, pooled, mask)


class T5TextEncoder(TextEncoder):
    """transformers `T5EncoderModel` (Imagen, Saharia et al. 2022); padded positions are masked and zeroed."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 128, freeze: bool = True,
                 zero_padding: bool = True, lowercase: bool = False):
        super().__init__(freeze)
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.zero_padding, self.lowercase = zero_padding, lowercase
        self.dim = self.pooled_dim = model.config.d_model
        self._apply_freeze()

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        if self.lowercase:  # diffusers' IF pipelines (without caption cleaning): lower-cased, stripped
            prompts = [p.lower().strip() for p in prompts]
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            if len(ids) > self.max_length - 1:  # room for </s>
                self._warn_truncated(prompt, self.tokenizer.decode(ids[self.max_length - 1:]))
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device).bool()
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.zero_padding:
            tokens = tokens * mask[..., None]
        pooled = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # masked mean
        return TextEmbeddings(tokens, pooled, mask)


class _SmallBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), x + mlp(ln(x)) (Xiong et al. 2020)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.ln_1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = x + self.proj(rearrange(attention(q, k, v, mask), "b h n d -> b n (h d)"))
        return x + self.mlp(self.ln_2(x))


class SmallTextEncoder(TextEncoder):
    """A small bidirectional transformer over UTF-8 bytes, trained with the diffusion model; pooled = the EOS token."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4, max_length: int = 128,
                 freeze: bool = False):
        super().__init__(freeze)
        if width % heads:
            raise ConfigError(f"SmallTextEncoder: width={width} must be divisible by heads={heads}")
        self.tokenizer = ByteTokenizer()
        self.max_length, self.dim, self.pooled_dim = max_length, width, width
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        self.blocks = nn.ModuleList(_SmallBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self._apply_freeze()

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        for prompt in prompts:
            ids, cut = self.tokenizer.encode(prompt), self.max_length - 2
            if len(ids) > cut:  # bytes cut words apart: name the whole word at the cut
                kept = self.tokenizer.decode(ids[:cut])
                head = "" if kept[-1:].isspace() else kept.split()[-1]
                self._warn_truncated(prompt, head + self.tokenizer.decode(ids[cut:]))
        ids, mask = self.tokenizer(prompts, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self.token_embedding(ids) + self.positional_embedding
        for block in self.blocks:
            x = block(x, mask)
        tokens = self.ln_final(x) * mask[..., None]
        pooled = tokens[torch.arange(len(ids), device=ids.device), mask.sum(dim=1) - 1]  # the EOS position
        # The U-Net attends to every position, the zeroed padding included (as SD's does), which is how the models
        # with this encoder were trained: the mask it is given is all True.
        return TextEmbeddings(tokens, pooled, torch.ones_like(mask))


TEXT_ENCODER_TYPES = ("clip", "openclip", "t5", "small")


@dataclass
class TextEncoderConfig:
    """Which text encoder to build; None fields take the type's default."""

    type: str = "clip"  # "clip" | "openclip" | "t5" | "small"
    layer: str | None = None  # "last" | "penultimate"; default: penultimate for openclip, else last
    max_length: int | None = None  # tokens; default: 77 (clip, openclip), 128 (t5, small)
    freeze: bool | None = None  # default: True, except "small" (trained with the diffusion model)
    hf_config: dict | None = None  # CLIPTextConfig / T5Config kwargs for a randomly initialised model
    open_clip: dict | None = None  # {"name": "ViT-H-14"} or {"embed_dim", "text_cfg", "quick_gelu"}
    small: dict | None = None  # SmallTextEncoder kwargs: width, layers, heads
    pretrained: str | None = None  # local folder / file, or hub id / open_clip tag when online
    zero_padding: bool = True  # t5: zero the padded positions' outputs (DeepFloyd IF keeps T5's values there)
    lowercase: bool = False  # t5: lower-case and strip prompts, as diffusers' IF pipelines do


def hf_config_fields(config: dict) -> dict:
    """A transformers config dict without its bookkeeping (what `TextEncoderConfig.hf_config` holds)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",
                                                                                     "transformers_version", "dtype")}


def _from_pretrained(cls, pretrained: str, subfolder: str):
    """`cls.from_pretrained` on a folder (or its `subfolder`, diffusers layout) or hub id, with an offline hint."""
    local = Path(pretrained)
    attempts = [dict(subfolder=subfolder)] if (local / subfolder).is_dir() else [{}, dict(subfolder=subfolder)]
    errors = []
    for kwargs in attempts:
        try:
            return cls.from_pretrained(pretrained, **kwargs)
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise CheckpointError(f"could not load {cls.__name__} from {pretrained!r} ({'; '.join(errors)}); "
                          "without internet, pass a local folder (a diffusers model folder or its "
                          f"{subfolder}/ folder) as `pretrained`")


def build_openclip_model(model_cfg: dict | None = None, pretrained: str | None = None) -> nn.Module:
    """An open_clip CLIP text tower; `model_cfg` as TextEncoderConfig.open_clip (default ViT-H-14).

    A config of `embed_dim` and a plain `text_cfg` builds ldm's `OpenCLIPTextTower` (no open_clip import); named
    architectures and other text configs are built by open_clip (its CLIP without the visual tower).
    """
    model_cfg = copy.deepcopy(model_cfg or {"name": "ViT-H-14"})
    if fits_tower(model_cfg):
        return _load_openclip_weights(OpenCLIPTextTower.from_config(model_cfg), pretrained)
    import open_clip
    from open_clip.model import CLIP, CLIPVisionCfg

    name = model_cfg.pop("name", None)
    if name is not None and pretrained is not None:
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"could not load open_clip {name!r} weights {pretrained!r}: {e}; without internet, "
                                  "pass a local weights file as `pretrained`") from e
        del model.visual
        return model
    if name is not None:
        found = open_clip.get_model_config(name)
        if found is None:
            raise ConfigError(f"unknown open_clip model name {name!r}")
        model_cfg = {**found, **model_cfg}
    unknown = set(model_cfg) - {"embed_dim", "text_cfg", "quick_gelu", "vision_cfg"}
    if unknown or "text_cfg" not in model_cfg:
        raise ConfigError(f"TextEncoderConfig.open_clip needs embed_dim and text_cfg; unknown keys {sorted(unknown)}")
    tiny_vision = CLIPVisionCfg(layers=1, width=8, head_width=8, patch_size=8, image_size=8)  # deleted right away
    model = CLIP(model_cfg.get("embed_dim", 512), tiny_vision, model_cfg["text_cfg"],
                 quick_gelu=model_cfg.get("quick_gelu", False))
    del model.visual
    return _load_openclip_weights(model, pretrained)


def _load_openclip_weights(model: nn.Module, pretrained: str | None) -> nn.Module:
    """Load an open_clip weights file (a whole CLIP: its `visual.*` keys are skipped) into a text tower."""
    if pretrained is not None:
        path = Path(pretrained)
        if not path.is_file():
            raise CheckpointError(f"open_clip weights file not found: {pretrained}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.get("state_dict", sd).items() if not k.startswith("visual.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{pretrained}: open_clip text weights do not fit the config "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def build_text_encoder(config: TextEncoderConfig, tokenizer_dir: str | Path | None = None) -> TextEncoder:
    """Build the configured encoder (random init from the config unless `pretrained` is set)."""
    freeze = config.freeze if config.freeze is not None else config.type != "small"
    layer = config.layer or ("penultimate" if config.type == "openclip" else "last")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if config.type == "clip":
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        if config.pretrained:
            model = _from_pretrained(CLIPTextModel, config.pretrained, "text_encoder")
            tokenizer = tokenizer or _from_pretrained(AutoTokenizer, config.pretrained, "tokenizer")
        else:
            model = CLIPTextModel(CLIPTextConfig(**(config.hf_config or SD1_CLIP_CONFIG)))
        return CLIPTextEncoder(model, tokenizer or clip_tokenizer(), layer, config.max_length, freeze)
    if config.type == "openclip":
        model = build_openclip_model(config.open_clip, config.pretrained)
        return OpenCLIPTextEncoder(model, layer, config.max_length, freeze)
    if config.type == "t5":
        from transformers import AutoTokenizer, T5Config, T5EncoderModel

        if layer != "last":
            raise ConfigError(f"T5TextEncoder supports layer='last' only, got {layer!r}")
        if config.pretrained:
            model = _from_pretrained(T5EncoderModel, config.pretrained, "text_encoder")
            tokenizer = tokenizer or _from_pretrained(AutoTokenizer, config.pretrained, "tokenizer")
        else:
            model = T5EncoderModel(T5Config(**(config.hf_config or {})))
        if tokenizer is None:
            raise ConfigError("a T5 text encoder needs a tokenizer: pass tokenizer_dir or a `pretrained` folder")
        return T5TextEncoder(model, tokenizer, config.max_length or 128, freeze, config.zero_padding, config.lowercase)
    if config.type == "small":
        if layer != "last":
            raise ConfigError(f"SmallTextEncoder supports layer='last' only, got {layer!r}")
        return SmallTextEncoder(**(config.small or {}), max_length=config.max_length or 128, freeze=freeze)
    raise ConfigError(f"TextEncoderConfig.type must be clip, openclip, t5 or small, got {config.type!r}")
