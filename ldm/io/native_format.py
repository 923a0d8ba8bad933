"""The native ldm folder: config.yaml (resolved sections) + one `.safetensors` per network (+ tokenizer/)."""
from __future__ import annotations

from pathlib import Path

from ldm.atomic import atomic_path
from ldm.config import from_dict, load_yaml, save_yaml
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import CheckpointError, ConfigError
from ldm.io.checkpoint import read_state_dict, write_safetensors
from ldm.io.components import SDComponents, autoencoder_config, make_components, text_config, unet_config
from ldm.models.text_encoders import TextEncoderConfig

FILES = {"unet": "unet.safetensors", "autoencoder": "autoencoder.safetensors",
         "text_encoder": "text_encoder.safetensors"}
SECTIONS = ("unet", "autoencoder", "text_encoder", "scheduler")
FORMAT = "ldm-native-v1"


def is_native_folder(path: Path) -> bool:
    """A native folder: config.yaml next to unet.safetensors."""
    return path.is_dir() and (path / "config.yaml").is_file() and (path / FILES["unet"]).is_file()


def load_native(folder: str | Path, *, device="cpu", dtype=None, prediction_type: str | None = None) -> SDComponents:
    """Load a folder written by `save_native`."""
    folder = Path(folder)
    config = load_yaml(folder / "config.yaml")
    missing = [s for s in SECTIONS if s not in config]
    unknown = sorted(set(config) - set(SECTIONS) - {"format"})
    if missing or unknown:
        raise ConfigError(f"{folder / 'config.yaml'}: expected sections {list(SECTIONS)}; "
                          f"missing {missing}, unknown {unknown}")
    try:
        sections = {"unet": unet_config(config["unet"]), "autoencoder": autoencoder_config(config["autoencoder"]),
                    "text_encoder": text_config(config["text_encoder"]),
                    "scheduler": from_dict(ScheduleConfig, config["scheduler"], where="scheduler")}
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.yaml'}: {e}") from e
    sources = {name: folder / file for name, file in FILES.items()}
    if not sources["text_encoder"].is_file():  # an open_clip text tower shared with a whole CLIP beside the folder
        sources["text_encoder"] = shared_text_weights(folder, sections["text_encoder"])
    weights = {name: read_state_dict(path) for name, path in sources.items()}
    if sources["text_encoder"].name != FILES["text_encoder"]:
        weights["text_encoder"] = {f"model.{k}": v for k, v in weights["text_encoder"].items()
                                   if not k.startswith("visual.")}
    tokenizer = folder / "tokenizer"
    return make_components(sections, weights, source=str(folder),
                           sources={name: str(path) for name, path in sources.items()}, device=device,
                           dtype=dtype, prediction_type=prediction_type, notes=[f"native ldm folder {folder}"],
                           tokenizer_dir=tokenizer if tokenizer.is_dir() else None)


def shared_text_weights(folder: Path, text: TextEncoderConfig) -> Path:
    """The whole open_clip CLIP file whose text tower is this folder's text encoder (`text_encoder.pretrained`,
    relative to the folder): the bundled model shares its text tower with the bundled CLIP instead of a copy."""
    if text.type != "openclip" or not text.pretrained:
        raise CheckpointError(f"{folder}: no {FILES['text_encoder']}, and text_encoder.pretrained names no open_clip "
                              "weights file to take the text tower from")
    path = (folder / text.pretrained).resolve()
    if not path.is_file():
        raise CheckpointError(f"{folder}: the text tower comes from {text.pretrained} (text_encoder.pretrained), "
                              f"which does not exist at {path}")
    return path


def save_native(components: SDComponents, folder: str | Path) -> None:
    """Write config.yaml, the three weight files and the tokenizer; the whole folder appears at once."""
    from ldm.models.tokenizers import save_tokenizer

    modules = {"unet": components.unet, "autoencoder": components.autoencoder, "text_encoder": components.text_encoder}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_yaml({"format": FORMAT, **{s: components.config[s] for s in SECTIONS}}, tmp / "config.yaml")
        for name, module in modules.items():
            write_safetensors(module.state_dict(), tmp / FILES[name], metadata={"format": "pt"})
        tokenizer = getattr(components.text_encoder, "tokenizer", None)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / "tokenizer")
