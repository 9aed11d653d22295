"""`load_policy`: a diffusers folder, a cached repo id, a single-file transformer, or "embedded".

Nothing here downloads: a repo id must already be in the local Hugging Face cache.
An optional `solrl.json` next to `model_index.json` holds adapter settings (e.g.
{"complex_human_instruction": false, "max_sequence_length": 16}); keyword arguments override it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .base import FlowPolicy, ModelNotFoundError
from .published import has_weights

EMBEDDED_DIR = Path(__file__).parent / "tiny" / "weights"
SETTINGS_FILE = "solrl.json"
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
FAMILIES = ("sana", "flux", "sd3")

# Substrings of a pipeline or transformer class name -> family.
_CLASS_HINTS = (("Sana", "sana"), ("Flux", "flux"), ("StableDiffusion3", "sd3"), ("SD3", "sd3"))


def load_policy(source: str, family: str = "auto", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, *, base: str | None = None, cache_dir: str | None = None,
                **settings) -> FlowPolicy:
    """Load a policy adapter.

    source: a diffusers folder, a repo id already in the local HF cache ("org/name"), a single-file
        transformer checkpoint (then `base` names the folder/repo id that provides the text
        encoders, VAE, scheduler and transformer config), or "embedded" (the tiny model shipped in
        the package).
    family: "auto" (from model_index.json / the transformer class) or one of "sana", "flux", "sd3".
    settings: adapter options (SANA: complex_human_instruction, max_sequence_length; all:
        resolution; FLUX: guidance, max_sequence_length).
    """
    if family not in ("auto", *FAMILIES):
        raise ValueError(f"unknown model family {family!r}: use 'auto' or one of {', '.join(FAMILIES)}")
    root, transformer_file = resolve_source(source, base, cache_dir)
    if transformer_file is None and not has_weights(root):
        raise ModelNotFoundError(f"{root} holds configs only, no weights (such folders serve --plan and "
                                 f"meta-device checks): point to a downloaded model")
    index = json.loads((root / "model_index.json").read_text())
    fam = detect_family(root, index) if family == "auto" else family
    options = {**read_settings(root), **settings}
    components = _load_components(root, index, fam, dtype, transformer_file)
    return policy_from_components(fam, components, device, dtype, str(transformer_file or source), **options)


def policy_from_components(family: str, components: dict, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, source: str = "", **settings) -> FlowPolicy:
    """The family's adapter around already built pipeline components (transformer, scheduler, vae,
    text_encoder*, tokenizer*), moved to `device`; text encoders and VAE frozen in eval mode."""
    policy = _build(family, components, device, dtype, source, dict(settings))
    policy.transformer.to(device)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(policy, name, None)
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return policy


def resolve_source(source: str, base: str | None = None, cache_dir: str | None = None) -> tuple[Path, Path | None]:
    """(pipeline folder, single-file transformer or None) for a source; raises ModelNotFoundError.

    Cheap (reads no weights): workflow validation calls it before any compute.
    """
    transformer_file: Path | None = None
    if source == "embedded":
        root = _require_pipeline_dir(EMBEDDED_DIR, "the embedded tiny model",
                                     "build it with the tiny-model training script (solrl_core/models/tiny)")
    elif Path(source).is_file() or Path(source).suffix in SINGLE_FILE_SUFFIXES:
        transformer_file = Path(source)
        if not transformer_file.is_file():
            raise ModelNotFoundError(f"single-file checkpoint {source} does not exist: check the path")
        if base is None:
            raise ModelNotFoundError(
                f"single-file checkpoint {source} holds only the transformer: pass base=<diffusers folder or "
                f"cached repo id> for the text encoders, VAE, scheduler and transformer config")
        root = resolve_model_dir(base, cache_dir)
    else:
        root = resolve_model_dir(source, cache_dir)
    return root, transformer_file


def resolve_model_dir(source: str, cache_dir: str | None = None) -> Path:
    """A diffusers folder on disk, or the snapshot folder of a repo id in the local HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _require_pipeline_dir(path, f"model folder {path}", "point to a diffusers-format folder")
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise ModelNotFoundError(f"model folder {source} does not exist: pass a diffusers folder, a cached "
                                 f"repo id (org/name) or 'embedded'")
    cache = Path(cache_dir or hf_cache_dir())
    snapshot = _cached_snapshot(source, cache)
    if snapshot is None:
        raise ModelNotFoundError(
            f"model {source} is not in the local Hugging Face cache {cache}: download it first "
            f"(huggingface-cli download {source}) or pass its folder")
    return _require_pipeline_dir(snapshot, f"cached model {source}", f"re-download it (huggingface-cli download {source})")


def hf_cache_dir() -> str:
    """The hub cache folder, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return str(Path.home() / ".cache" / "huggingface" / "hub")


def _cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
    return snapshots[-1] if len(snapshots) == 1 else None


def _require_pipeline_dir(path: Path, what: str, how: str) -> Path:
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{what}: no model_index.json in {path}: {how}")
    index = json.loads((path / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if name in ("feature_extractor", "image_encoder", "safety_checker"):
            continue
        if not (path / name).is_dir():
            raise ModelNotFoundError(f"{what} is incomplete: {path / name} (listed in model_index.json) is "
                                     f"missing: {how}")
    return path


def detect_family(root: Path, index: dict) -> str:
    names = [index.get("_class_name", "")]
    config = root / "transformer" / "config.json"
    if config.is_file():
        names.append(json.loads(config.read_text()).get("_class_name", ""))
    for name in names:
        for hint, fam in _CLASS_HINTS:
            if hint in name:
                return fam
    raise ValueError(f"cannot tell the model family of {root} from classes {names}: pass family="
                     f"one of {', '.join(FAMILIES)}")


def read_settings(root: Path) -> dict:
    path = root / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _pipeline_class(fam: str):
    import diffusers

    return {"sana": diffusers.SanaPipeline, "flux": diffusers.FluxPipeline,
            "sd3": diffusers.StableDiffusion3Pipeline}[fam]


def _load_components(root: Path, index: dict, fam: str, dtype: torch.dtype, transformer_file: Path | None):
    """Load every pipeline component with diffusers; absent ones (e.g. no VAE) become None."""
    cls = _pipeline_class(fam)
    expected = cls._get_signature_keys(cls)[0]
    overrides = {}
    for name in expected:
        spec = index.get(name)
        if spec is None or (isinstance(spec, list) and spec[0] is None):
            overrides[name] = None
    if transformer_file is not None:
        overrides["transformer"] = _transformer_from_single_file(fam, transformer_file, root, dtype)
    pipe = cls.from_pretrained(str(root), torch_dtype=dtype, **overrides)
    return {name: getattr(pipe, name, None) for name in expected}


def _transformer_from_single_file(fam: str, path: Path, root: Path, dtype: torch.dtype):
    import diffusers

    cls = {"sana": diffusers.SanaTransformer2DModel, "flux": diffusers.FluxTransformer2DModel,
           "sd3": diffusers.SD3Transformer2DModel}[fam]
    return cls.from_single_file(str(path), config=str(root), subfolder="transformer", torch_dtype=dtype,
                                local_files_only=True)


def _build(fam: str, c: dict, device, dtype, source: str, options: dict) -> FlowPolicy:
    if fam == "sana":
        from .sana import SanaPolicy, default_complex_human_instruction

        chi = options.pop("complex_human_instruction", None)
        if chi is None:  # default: SANA checkpoints (with a VAE) were trained with the instruction
            chi = c["vae"] is not None
        if chi is True:
            chi = default_complex_human_instruction()
        # A small tokenizer (the tiny model's: 16 tokens) caps the prompt length SANA pads to (300).
        options.setdefault("max_sequence_length", min(300, int(getattr(c["tokenizer"], "model_max_length", 300))))
        return SanaPolicy(c["transformer"], c["text_encoder"], c["tokenizer"], vae=c["vae"],
                          scheduler=c["scheduler"], device=device, dtype=dtype, source=source,
                          complex_human_instruction=chi or (), **options)
    if fam == "flux":
        from .flux import FluxPolicy

        return FluxPolicy(c, device=device, dtype=dtype, source=source, **options)
    from .sd3 import SD3Policy

    return SD3Policy(c, device=device, dtype=dtype, source=source, **options)
