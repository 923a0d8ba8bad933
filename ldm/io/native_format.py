"""The native ldm folder: config.yaml (resolved sections) + one `.safetensors` per network (+ tokenizer/)."""
from __future__ import annotations

from pathlib import Path

from ldm.atomic import atomic_path
from ldm.config import from_dict, load_yaml, save_yaml
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError
from ldm.io.checkpoint import read_state_dict, write_safetensors
from ldm.io.components import SDComponents, autoencoder_config, make_components, text_config, unet_config

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
    weights = {name: read_state_dict(folder / file) for name, file in FILES.items()}
    tokenizer = folder / "tokenizer"
    return make_components(sections, weights, source=str(folder),
                           sources={name: str(folder / file) for name, file in FILES.items()}, device=device,
                           dtype=dtype, prediction_type=prediction_type, notes=[f"native ldm folder {folder}"],
                           tokenizer_dir=tokenizer if tokenizer.is_dir() else None)


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
