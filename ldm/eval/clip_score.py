"""CLIP score (Hessel et al. 2021, w = 100 as in text-to-image reports) and an open_clip feature extractor."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.errors import CheckpointError, LdmError

DEFAULT_CLIP_MODEL = "ViT-B-32"  # the architecture when only --clip-pretrained is given
RANDOM_WEIGHTS = "none"  # --clip-pretrained none: seeded random weights, for tests only
# The CLIP the project trained on its emoji data (tools/train_clip.py, docs/default-model.md): used offline when
# neither --clip-model nor --clip-pretrained is given.
BUNDLED_CLIP = Path(__file__).resolve().parents[1] / "assets" / "clip-emoji"
BUNDLED_CLIP_NAME = "clip-emoji"


def bundled_clip() -> tuple[str, str]:
    """(config .json, weights .safetensors) of the bundled CLIP, or an LdmError saying how to choose another."""
    config, weights = BUNDLED_CLIP / f"{BUNDLED_CLIP_NAME}.json", BUNDLED_CLIP / f"{BUNDLED_CLIP_NAME}.safetensors"
    if not (config.is_file() and weights.is_file()):
        raise LdmError(f"the bundled CLIP is missing from {BUNDLED_CLIP}; choose one with --clip-model and "
                       "--clip-pretrained (a tag such as 'openai', or a local weights file)")
    return str(config), str(weights)


def clip_score(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Per pair 100 * max(cos(image, text), 0): `b d, b d -> b`."""
    if img_emb.shape != txt_emb.shape:
        raise LdmError(f"image and text embeddings differ in shape: {tuple(img_emb.shape)} vs {tuple(txt_emb.shape)}")
    cos = F.cosine_similarity(img_emb.double(), txt_emb.double(), dim=-1)
    return 100 * cos.clamp(min=0)


def _model_name(name: str) -> str:
    """A built-in open_clip architecture name, or a path to a model config .json (registered on the fly)."""
    import open_clip

    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise LdmError(f"--clip-model {name}: config file does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise LdmError(
            f"--clip-model {name}: unknown open_clip architecture; see open_clip.list_models() or pass a config .json"
        )
    return name


@torch.no_grad()
def _reproducible_random_weights(net: torch.nn.Module, seed: int = 0) -> None:
    """Redraw the weights from a private generator at a default Linear's scale (std fan_in^-1/2).

    Constant tensors of open_clip's initialisation (LayerNorm gains, zero biases) are kept as they are.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in net.parameters():
        if not param.is_floating_point() or param.numel() < 2 or bool((param == param.flatten()[0]).all()):
            continue
        fan_in = param.numel() // param.shape[0] if param.ndim > 1 else param.numel()
        param.copy_((torch.randn(param.shape, generator=generator) * fan_in**-0.5).to(param))


def check_clip_weights(model: str, pretrained: str) -> str:
    """`pretrained` is "none", a file, or a tag open_clip knows for `model`; returns the architecture name."""
    import open_clip

    arch = _model_name(model)
    if pretrained.lower() != RANDOM_WEIGHTS and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise LdmError(
                f"--clip-pretrained {pretrained}: neither a file nor a known tag for {arch} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
    return arch


class ClipModel:
    """An open_clip model as a `FeatureExtractor` of image embeddings, plus text embeddings for the CLIP score."""

    dim: int

    def __init__(
        self, model: str | None = None, pretrained: str | None = None, device: torch.device | str = "cpu"
    ):
        import open_clip

        self.bundled = model is None and pretrained is None
        if self.bundled:
            model, pretrained = bundled_clip()
        model = model or DEFAULT_CLIP_MODEL
        if pretrained is None:
            raise LdmError(
                f"choose the CLIP weights with --clip-pretrained: a tag such as 'openai' (downloads; tags for {model}: "
                "open_clip.list_pretrained_tags_by_model), a local weights file, or 'none' for random weights "
                "(meaningless numbers, for tests)"
            )
        arch = check_clip_weights(model, pretrained)
        self.model_name, self.pretrained, self.random_weights = model, pretrained, pretrained.lower() == RANDOM_WEIGHTS
        try:
            with torch.random.fork_rng(devices=[]):  # open_clip initialises from the global RNG: leave it as it was
                net, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=None if self.random_weights else pretrained, device=device
                )
        except RuntimeError as e:
            where = "a local weights file" if not Path(pretrained).is_file() else "another file"
            raise CheckpointError(
                f"cannot load CLIP {arch} weights {pretrained!r}: {e}. Offline, download them elsewhere "
                f"and pass {where} "
                "with --clip-pretrained"
            ) from e
        if self.random_weights:
            _reproducible_random_weights(net)
        self.net, self.preprocess = net.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = torch.device(device)
        self.dim = int(self.encode_texts(["a"]).shape[-1])
        tag = (
            RANDOM_WEIGHTS
            if self.random_weights
            else (os.path.basename(pretrained) if Path(pretrained).is_file() else pretrained)
        )
        self.name = f"clip:{arch}:{tag}"

    @classmethod
    def bundled(cls, device: torch.device | str = "cpu") -> "ClipModel":
        """The bundled CLIP (ldm/assets/clip-emoji), what ldm-eval uses when no CLIP is chosen."""
        return cls(None, None, device=device)

    def describe(self) -> dict:
        """How the score was measured: always part of a report."""
        out = {"name": self.model_name, "pretrained": self.pretrained, "random_weights": self.random_weights}
        if self.bundled:
            out["bundled"] = f"the toolkit's own {BUNDLED_CLIP_NAME} CLIP (ldm/assets/{BUNDLED_CLIP.name}, docs/default-model.md)"
        return out

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> the model's preprocessed `3 h w` (resize, centre crop, normalise)."""
        return self.preprocess(image)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Image embeddings `b 3 h w -> b d` (not normalised)."""
        return self.net.encode_image(batch).float()

    @property
    def context_length(self) -> int | None:
        """How many tokens of a prompt the text tower reads (start and end tokens included; 77 for OpenAI's CLIP)."""
        return getattr(self.tokenizer, "context_length", None)

    def truncated_prompts(self, texts: list[str]) -> list[int]:
        """Indices of the prompts longer than the text context: the tokenizer keeps their first tokens and ends them
        with the end token (as OpenAI's CLIP and torchmetrics' CLIPScore do), so their score sees only those."""
        n = self.context_length
        if not n or not texts:
            return []
        short, longer = self.tokenizer(texts, context_length=n), self.tokenizer(texts, context_length=n + 1)
        return [i for i in range(len(texts)) if not torch.equal(short[i], longer[i, :n])]

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Text embeddings `n d` (float32, CPU); prompts longer than the context are truncated by the tokenizer,
        with a warning naming how many and the first of them."""
        cut = self.truncated_prompts(texts)
        if cut:
            warnings.warn(f"{len(cut)} of {len(texts)} prompts are longer than {self.name}'s text context of "
                          f"{self.context_length} tokens and are scored on their first tokens only, e.g. "
                          f"{texts[cut[0]][:200]!r}", stacklevel=2)
        out = [
            self.net.encode_text(self.tokenizer(texts[i : i + batch_size]).to(self.device)).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out)
