"""Optional extras: the packages the code checks for are the ones pyproject's extras install, and a
missing one gives one line naming what needs it and the pip command."""
import sys
from pathlib import Path

import pytest

from solrl_core.runtime import extras
from solrl_core.train.optimizers import OptimizerUnavailableError, build_optimizer

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.mark.parametrize("extra", sorted(extras.EXTRAS))
def test_each_extra_names_the_package_pyproject_installs(extra):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][extra]
    assert [req.split("[")[0] for req in declared] == [extras.EXTRAS[extra][1]]


def test_installed_extra_is_not_reported():
    assert extras.missing_extra("tensorboard", "log_to tensorboard") is None  # the test extra installs it


def test_missing_extra_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "adamw8bit", ("solrl_no_such_module", "torchao"))
    expected = 'the 8-bit AdamW needs torchao, which is not installed: pip install -e ".[adamw8bit]"'
    assert extras.missing_extra("adamw8bit", "the 8-bit AdamW") == expected
    with pytest.raises(OptimizerUnavailableError) as err:  # the optimizer says the same before building
        build_optimizer([], {"kind": "adamw8bit", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8})
    assert str(err.value) == expected


def test_installed_but_broken_package_says_so():
    error = extras.extra_import_error("wandb", "log_to wandb", ImportError("libfoo.so missing"))
    assert str(error) == ('log_to wandb needs wandb, which is installed but does not import (libfoo.so missing): '
                          'pip install -e ".[wandb]"')


def test_the_ocr_reward_names_its_extra_at_validation(monkeypatch):
    from solrl_core.rewards.base import RewardDependencyError
    from solrl_core.rewards.ocr import OcrReward

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if it were not installed
    with pytest.raises(RewardDependencyError) as err:
        OcrReward().check_files()
    assert str(err.value) == ("reward 'ocr' needs rapidocr-onnxruntime, which is not installed: "
                              'pip install -e ".[ocr]"')
