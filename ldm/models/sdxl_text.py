"""SDXL's two text encoders behind one `encode` (Podell et al. 2023, sec. 2.1): CLIP ViT-L and OpenCLIP ViT-bigG.

Tokens: the penultimate hidden state of each (no final LayerNorm), concatenated (768 + 1280 = 2048 wide); with
diffusers' `clip_skip` N, each tower's hidden state N blocks earlier still (again no LayerNorm). Pooled: bigG's
projected end-of-text embedding from its last layer, whatever clip_skip. The refiner has bigG only. Keys follow sgm's
`conditioner.embedders.{i}` (without `conditioner.`): `embedders.0.transformer.text_model.*` for CLIP ViT-L,
`embedders.1.model.*` (the refiner: `embedders.0.model.*`) for the open_clip tower.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.models.text_encoders import (SD1_CLIP_CONFIG, CLIPTextEncoder, OpenCLIPTextEncoder, TextEmbeddings,
                                      TextEncoder, build_openclip_model)
from ldm.models.tokenizers import clip_tokenizer


@dataclass
class SDXLTextConfig:
    """SDXL's text conditioning: CLIP ViT-L (`clip`, CLIPTextConfig kwargs; None for the refiner) and an open_clip
    tower (`open_clip`, as TextEncoderConfig.open_clip: a name or embed_dim + text_cfg)."""

    type: str = "sdxl"
    clip: dict | None = field(default_factory=lambda: dict(SD1_CLIP_CONFIG))
    open_clip: dict = field(default_factory=lambda: {"name": "ViT-bigG-14"})
    max_length: int = 77
    force_zeros_for_empty_prompt: bool = True  # no negative prompt -> zero embeddings, not those of "" (base model)
    freeze: bool = True

    def __post_init__(self):
        if self.type != "sdxl":
            raise ConfigError(f"SDXLTextConfig.type must be 'sdxl', got {self.type!r}")


class SDXLTextEncoder(TextEncoder):
    """CLIP ViT-L (optional) + OpenCLIP bigG, penultimate layers concatenated; pooled = bigG's projection."""

    def __init__(self, clip_model: nn.Module | None, openclip_model: nn.Module, max_length: int = 77,
                 force_zeros_for_empty_prompt: bool = True, freeze: bool = True):
        super().__init__(freeze)
        embedders = []
        if clip_model is not None:  # SDXL's tokenizer pads with <|endoftext|>, like SD-1's
            embedders.append(CLIPTextEncoder(clip_model, clip_tokenizer(), "last", max_length, freeze))
        if hasattr(openclip_model, "logit_scale"):
            del openclip_model.logit_scale  # the contrastive temperature: unused, and diffusers does not keep it
        embedders.append(OpenCLIPTextEncoder(openclip_model, "penultimate", max_length, freeze))
        self.embedders = nn.ModuleList(embedders)
        self.bigg_tokenizer = clip_tokenizer(pad_token="!")  # diffusers' tokenizer_2 pads with "!" (id 0)
        self.max_length = self.bigg.max_length
        self.dim = self.bigg.dim + (self.clip.dim if self.clip is not None else 0)
        self.pooled_dim = self.bigg.pooled_dim
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._apply_freeze()

    @property
    def clip(self) -> CLIPTextEncoder | None:
        """CLIP ViT-L (None in the refiner)."""
        return self.embedders[0] if len(self.embedders) == 2 else None

    @property
    def bigg(self) -> OpenCLIPTextEncoder:
        """OpenCLIP ViT-bigG."""
        return self.embedders[-1]

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def max_clip_skip(self) -> int:
        # each tower is read at its penultimate block already: clip_skip N reads block L - 1 - N, which must exist
        return min(e.num_layers for e in self.embedders) - 2

    def _layers_note(self) -> str:
        layers = " and ".join(f"{e.num_layers}" for e in self.embedders)
        return f"its towers have {layers} layers and are read at the penultimate one"

    def _bigg(self, ids: torch.Tensor, clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state `b n d` 1 + clip_skip blocks before the end, projected pooled `b e` from the last block) of
        the open_clip tower."""
        m = self.bigg.model
        x = m.token_embedding(ids) + m.positional_embedding[:ids.shape[1]].to(m.token_embedding.weight.dtype)
        blocks = m.transformer.resblocks
        skip = 1 + clip_skip
        hidden = self.bigg._blocks(x, blocks[:-skip])
        last = m.ln_final(self.bigg._blocks(hidden, blocks[-skip:]))
        pooled = last[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]  # end-of-text: the largest id
        proj = m.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return hidden, pooled

    def _encode(self, prompts: list[str], clip_skip: int = 0) -> TextEmbeddings:
        for prompt in prompts:
            ids = self.bigg_tokenizer(prompt, add_special_tokens=False).input_ids
            if len(ids) > self.max_length - 2:  # room for <start> and <end>
                self._warn_truncated(prompt, self.bigg_tokenizer.decode(ids[self.max_length - 2:]))
        tokens = []
        if self.clip is not None:  # sgm's FrozenCLIPEmbedder(layer="hidden", layer_idx=11): no final LayerNorm
            out = self.clip.hf_model(self._ids(self.clip.tokenizer, prompts), output_hidden_states=True)
            tokens.append(out.hidden_states[-2 - clip_skip])  # diffusers' clip_skip counts on from the penultimate
        ids = self._ids(self.bigg_tokenizer, prompts)
        hidden, pooled = self._bigg(ids, clip_skip)  # the pooled embedding keeps the last block, whatever clip_skip
        tokens.append(hidden)
        # the U-Net attends to all max_length positions, padding included
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        return TextEmbeddings(torch.cat(tokens, dim=-1), pooled, mask)


def build_sdxl_text_encoder(config: SDXLTextConfig) -> SDXLTextEncoder:
    """SDXL's text encoders with random weights from `config` (tokenizers from open_clip's bundled BPE, offline)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(**config.clip)) if config.clip is not None else None
    return SDXLTextEncoder(clip, build_openclip_model(config.open_clip), config.max_length,
                           config.force_zeros_for_empty_prompt, config.freeze)
