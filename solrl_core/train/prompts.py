"""Prompt sets and the resumable, seeded order in which a run visits them."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import scenes

BUNDLED_PROMPTS = Path(__file__).resolve().parent.parent.parent / "workflows"
BUILTIN = {
    "shapes_single": ("single",),
    "shapes_count": ("count",),
    "shapes_relation": ("relation",),
    "shapes_compositional": ("count", "relation"),
    "shapes_objects": ("single", "count"),
    "shapes_all": ("single", "count", "relation"),
}


def builtin_prompts(name: str) -> list[str]:
    return [scenes.caption(s) for kind in BUILTIN[name] for s in scenes.all_specs(kind)]


def load_prompts(source: str) -> list[str]:
    """A built-in set name, or a .txt (one prompt a line) / .json (list of strings) file."""
    if source in BUILTIN:
        return builtin_prompts(source)
    path = Path(source).expanduser()
    if not path.is_file() and (BUNDLED_PROMPTS / source).is_file():
        path = BUNDLED_PROMPTS / source  # prompt files shipped beside the bundled workflows
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} not found (looked at {path.resolve()} and in "
                                f"{BUNDLED_PROMPTS}); give a "
                                f".txt or .json file or one of the built-in sets {sorted(BUILTIN)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {source} is not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {source}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not (isinstance(data, list) and all(isinstance(p, str) for p in data)):
            raise ValueError(f"prompt file {source}: expected a JSON list of strings")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {source} has no prompts")
    return prompts


def split_prompts(prompts: list[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): `held_out` distinct prompts kept out of training.

    Which prompts are held out depends only on the seed and each prompt's text (the `held_out` with
    the smallest seeded hash), so the split is the same for any order of the prompt file and on
    every resume. A prompt listed twice is held out entirely, never in both sets. Held-out prompts
    keep their order in the set.
    """
    distinct = list(dict.fromkeys(prompts))
    if held_out < 0 or (held_out and held_out >= len(distinct)):
        raise ValueError(f"held_out={held_out} must be at least 0 and leave training prompts: the prompt set "
                         f"has {len(distinct)} distinct prompts")

    def rank(prompt: str) -> bytes:
        return hashlib.sha256(f"{seed}/held-out/{prompt}".encode()).digest()

    chosen = set(sorted(distinct, key=rank)[:held_out])
    return [p for p in prompts if p not in chosen], [p for p in distinct if p in chosen]


@dataclass
class PromptCursor:
    """Position in a seeded per-epoch permutation of the prompt set (saved with the run)."""

    epoch: int = 0
    offset: int = 0

    def take(self, prompts: list[str], count: int, seed: int) -> tuple[list[str], PromptCursor]:
        """`count` distinct prompts (when the set is large enough) and the cursor after them."""
        out: list[str] = []
        epoch, offset = self.epoch, self.offset
        while len(out) < count:
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            take = order[offset: offset + count - len(out)].tolist()
            out.extend(prompts[i] for i in take)
            offset += len(take)
            if offset >= len(prompts):
                epoch, offset = epoch + 1, 0
        return out, PromptCursor(epoch, offset)
