"""Optional extras (pyproject's optional-dependencies): whether one is installed, and the one-line error
that says what needs it and how to add it. Checked by module spec, without importing the package."""
from __future__ import annotations

import importlib.util

# extra -> (module that must be importable, the package pip installs)
EXTRAS = {
    "adamw8bit": ("torchao", "torchao"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "ocr": ("rapidocr_onnxruntime", "rapidocr-onnxruntime"),
    "gpu": ("transformer_engine", "transformer-engine"),
}


def install_command(extra: str) -> str:
    return f'pip install -e ".[{extra}]"'


def missing_extra(extra: str, needed_by: str) -> str | None:
    """None when `extra`'s package is installed, else "<needed_by> needs <package>, which is not installed: <pip>"."""
    module, package = EXTRAS[extra]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{needed_by} needs {package}, which is not installed: {install_command(extra)}"


def extra_import_error(extra: str, needed_by: str, error: ImportError) -> ImportError:
    """The one-line error for a failed import of an extra's package: not installed, or installed but broken."""
    package = EXTRAS[extra][1]
    problem = missing_extra(extra, needed_by) or (
        f"{needed_by} needs {package}, which is installed but does not import ({error}): {install_command(extra)}")
    return ImportError(problem)
