"""Rewards: the stage-1 proxy ranker and the stage-2 training signal.

    r = load_reward("pickscore", search_dirs=[...]); r.check_files(); scores = r(images, prompts)
    w = WeightedReward([(r1, 1.0), (r2, 0.5)]); total, components = w.score(images, prompts)
"""
from .base import Reward, RewardDependencyError
from .files import MODELS_DIR_ENV, RequiredFile, RewardFileNotFoundError
from .registry import REWARDS, load_reward, load_weighted_reward, parse_reward_spec
from .shapes import Judgement, judge
from .weighted import WeightedReward

__all__ = [
    "MODELS_DIR_ENV", "REWARDS", "Judgement", "RequiredFile", "Reward", "RewardDependencyError",
    "RewardFileNotFoundError", "WeightedReward", "judge", "load_reward", "load_weighted_reward",
    "parse_reward_spec",
]
