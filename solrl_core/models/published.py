"""Published model configurations, shipped as config-only diffusers folders (no weights).

`configs/` holds SANA-1600M-1024px, FLUX.1-dev and SD3.5-Large as published: model_index.json and
the configs of the transformer, text encoders, VAE and scheduler (tokenizer folders carry only
their small tokenizer_config.json; no vocabulary, no weights). Any component builds from them on
the meta device in well under a second, so layer choices, parameter counts and memory plans are
checked at the real sizes without downloading anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import ModelNotFoundError

CONFIGS_DIR = Path(__file__).parent / "configs"
# Hugging Face repo id -> shipped config-only folder.
PUBLISHED = {
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": "sana_1600m_1024px",
    "black-forest-labs/FLUX.1-dev": "flux1_dev",
    "stabilityai/stable-diffusion-3.5-large": "sd35_large",
}
FAMILY_DEFAULT = {"sana": "sana_1600m_1024px", "flux": "flux1_dev", "sd3": "sd35_large"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".sft")
SKIPPED_KINDS = ("tokenizer", "scheduler", "feature_extractor", "image_encoder", "safety_checker")


def published_folder(name: str) -> Path:
    """The shipped config folder for a repo id ("black-forest-labs/FLUX.1-dev"), a family ("flux")
    or a folder name ("flux1_dev")."""
    folder = PUBLISHED.get(name) or FAMILY_DEFAULT.get(name) or name
    path = CONFIGS_DIR / folder
    if not (path / "model_index.json").is_file():
        known = ", ".join([*PUBLISHED, *FAMILY_DEFAULT])
        raise ModelNotFoundError(f"no shipped config for {name!r} (known: {known})")
    return path


def has_weights(folder: Path | str) -> bool:
    """Whether a diffusers folder holds transformer weights (config-only folders hold none)."""
    sub = Path(folder) / "transformer"
    return sub.is_dir() and any(p.suffix in WEIGHT_SUFFIXES for p in sub.iterdir())


def pipeline_index(folder: Path | str) -> dict[str, tuple[str, str]]:
    """Every present component of a pipeline folder: name -> (library, class), from model_index.json."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: (spec[0], spec[1]) for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None}


def model_components(folder: Path | str) -> dict[str, tuple[str, str]]:
    """The neural components (transformer, text encoders, VAE): name -> (library, class)."""
    return {name: spec for name, spec in pipeline_index(folder).items() if not name.startswith(SKIPPED_KINDS)}


def component_config(folder: Path | str, name: str) -> dict:
    sub = Path(folder) / name
    path = sub / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{sub}: no config.json for component {name!r}")
    return json.loads(path.read_text())


def build_component(folder: Path | str, name: str, device: torch.device | str = "meta",
                    dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """A pipeline component built from its config (random init, or shapes only on "meta").

    `overrides` replace config entries (e.g. num_layers=1 for a real-width slice of the transformer).
    """
    library, class_name = model_components(folder)[name]
    config = component_config(folder, name)
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        with torch.device(device):
            module = cls.from_config({**config, **overrides})
    else:
        import transformers

        cls = getattr(transformers, class_name)
        hf_config = transformers.AutoConfig.for_model(**{**config, **overrides})
        with torch.device(device):
            module = cls._from_config(hf_config)
    module.requires_grad_(False)
    if dtype is None:
        return module
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(dtype)  # diffusers keeps those modules in fp32
    return nn.Module.to(module, dtype)  # (diffusers' own .to warns for every model without any)


def build_scheduler(folder: Path | str):
    """The pipeline's scheduler from its scheduler_config.json (None when the pipeline has none)."""
    spec = pipeline_index(folder).get("scheduler")
    if spec is None:
        return None
    import diffusers

    cls = getattr(diffusers, spec[1])
    return cls.from_config(cls.load_config(str(Path(folder) / "scheduler")))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_config_folder(components: dict, folder: Path | str, pipeline_class: str) -> Path:
    """A config-only diffusers folder describing in-memory components (for --plan and meta builds):
    model_index.json, each model's config, tokenizer files (small for code-built tokenizers), no weights."""
    folder = Path(folder)
    index: dict = {"_class_name": pipeline_class}
    for name, part in components.items():
        if part is None:
            continue
        library = type(part).__module__.split(".")[0]
        index[name] = [library, type(part).__name__]
        target = folder / name
        if hasattr(part, "save_config"):  # diffusers models and schedulers
            part.save_config(target)
        elif hasattr(part, "save_pretrained") and not isinstance(part, nn.Module):  # tokenizers
            part.save_pretrained(str(target))
        else:  # transformers models
            part.config.save_pretrained(target)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
