"""Where reward weights come from: an explicit path, else $SOLRL_MODELS_DIR, else extra search dirs.

Layout under any root (SOLRL_MODELS_DIR or a search dir): `<root>/<reward>/<file>` or `<root>/<file>`,
e.g. `$SOLRL_MODELS_DIR/hpsv2/HPS_v2.1_compressed.pt`, `$SOLRL_MODELS_DIR/pickscore/config.json`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "SOLRL_MODELS_DIR"


class RewardFileNotFoundError(FileNotFoundError):
    """A reward's weights (or tokenizer) file is missing; the message is one line: file, places, source."""


@dataclass(frozen=True)
class RequiredFile:
    """One file (or model folder) a reward needs, where it was looked for and how to get it."""

    reward: str
    names: tuple[str, ...]  # accepted names (relative paths), preferred first
    subfolder: str  # the reward's folder under a models root
    source: str  # how to obtain it, e.g. "download ImageReward.pt from the Hugging Face repo THUDM/ImageReward"
    is_dir: bool = False  # a model folder (recognised by a config.json inside) rather than one file
    searched: tuple[str, ...] = ()
    found: str | None = None

    @property
    def exists(self) -> bool:
        return self.found is not None

    def error(self) -> RewardFileNotFoundError:
        what = " or ".join(self.names) + (" (a model folder with config.json)" if self.is_dir else "")
        where = ", ".join(self.searched) if self.searched else (
            f"nowhere: {MODELS_DIR_ENV} is not set, no path and no search dirs were given")
        return RewardFileNotFoundError(
            f"reward '{self.reward}' needs {what}; searched: {where}; to fix: {self.source}, "
            f"then put it in ${MODELS_DIR_ENV}/{self.subfolder}/ or pass its path")


def models_roots(search_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """$SOLRL_MODELS_DIR first, then the caller's search dirs (the ComfyUI layer passes its model folders)."""
    roots = [Path(p) for p in os.environ.get(MODELS_DIR_ENV, "").split(os.pathsep) if p]
    return roots + [Path(p) for p in search_dirs]


def _present(p: Path, is_dir: bool) -> bool:
    return (p / "config.json").is_file() if is_dir else p.is_file()


def find_required(reward: str, names: Sequence[str], subfolder: str, source: str, *, is_dir: bool = False,
                  path: str | os.PathLike | None = None,
                  search_dirs: Sequence[str | os.PathLike] = ()) -> RequiredFile:
    """Resolve one required file. An explicit `path` (the file itself or a folder holding it) is the only
    place looked at when given; otherwise every root is searched as `<root>/<subfolder>/<name>`,
    `<root>/<name>` (and, for model folders, `<root>/<subfolder>` itself)."""
    # (candidate, what to show in the error): files are shown by their folder to keep the line short
    candidates: list[tuple[Path, Path]] = []
    if path is not None:
        p = Path(path)
        if is_dir:
            candidates += [(p, p)] + [(p / n, p / n) for n in names]
        elif p.is_dir():
            candidates += [(p / n, p) for n in names]
        else:
            candidates.append((p, p))
    else:
        for root in models_roots(search_dirs):
            if is_dir:
                candidates.append((root / subfolder, root / subfolder))
            candidates += [(root / subfolder / n, root / subfolder) for n in names]
            candidates += [(root / n, root) for n in names]
    found = next((c for c, _ in candidates if _present(c, is_dir)), None)
    searched = tuple(dict.fromkeys(str(shown) for _, shown in candidates))
    return RequiredFile(reward, tuple(names), subfolder, source, is_dir, searched,
                        str(found) if found is not None else None)
