"""The settings of a run and of each stage of an iteration: every default and bound is defined here once.

The nodes' inputs are generated from these fields (`Input.of`), the bundled recipes take their
defaults from them, and the stage functions take them as arguments; building one checks it (see
runtime.settings). Defaults are the reference's (algorithm.md sections 1 and 3).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..quant.backends import BACKENDS
from ..runtime.settings import Settings, setting
from .selection import MODES, check_sizes

# The settings that trade time for memory, by name (the run's manifest records them; the memory plan
# counts them). None changes what a run computes beyond the rounding stated in its test.
MEMORY_SETTINGS = ("offload_frozen", "regenerator", "gradient_checkpointing", "optimizer", "micro_batch",
                   "batch_size")
OPTIMIZERS = ("adamw", "adamw8bit")
REGENERATORS = ("merged_copy", "adapter")


@dataclass(frozen=True)
class SessionConfig(Settings):
    """What must stay the same for a run to be resumed (checked on resume), and the run's offloading
    (`PER_PRESS`: may change between presses)."""

    PER_PRESS = ("offload_frozen",)

    seed: int = setting(0, min=0, max=2**31 - 1, help="Fixes every random draw of the run.")
    total_iterations: int = setting(100, min=1, max=10**7, help="The run ends after this many iterations.")
    lora_rank: int = setting(32, min=1, max=1024, help="LoRA rank r.")
    lora_alpha: float = setting(64.0, min=0.0, max=4096.0, help="LoRA alpha: the adapter is scaled by alpha / r.")
    full_finetune: bool = setting(False, help="Train every weight instead of LoRA (small models).")
    offload_frozen: bool = setting(False, help="Keep frozen parts on the CPU outside the stages that use them: "
                                               "text encoders after encoding, reward models outside scoring, "
                                               "the explorer outside requantize and exploration (memory for "
                                               "transfer time; same results).")
    held_out: int = setting(0, min=0, max=10**6,
                            help="Prompts of the set kept out of training (a split seeded by 'seed'), scored by the "
                                 "Held-out Reward node; 0: none.")

    def run_identity(self) -> dict:
        """The fields a resumed run must share with the saved one."""
        return {k: v for k, v in asdict(self).items() if k not in self.PER_PRESS}


@dataclass(frozen=True)
class RequantizeSettings(Settings):
    """How the sampling policy's low-precision explorer copy is made."""

    backend: str = setting("auto", choices=("auto", *BACKENDS),
                           help="auto: NVFP4 on Blackwell, FP8 on Hopper / Ada, emulated NVFP4 on CPU; fast CPU "
                                "explorers: cpu_int8 (int8 linears), cpu_bf16 (the whole copy in bf16; CPUs with "
                                "native bf16, min_dim and weight_tile do not apply); none: no explorer (full "
                                "precision only).")
    min_dim: int = setting(-1, min=-1, max=1 << 20,
                           help="Skip layers with max(in, out) <= this; -1: the model family's default.")
    weight_tile: str = setting("16x16", choices=("16x16", "1x16"), help="NVFP4 weight scaling block.")
    regenerator: str = setting("merged_copy", choices=REGENERATORS,
                               help="merged_copy: regenerate with a separate full-precision copy with the sampling "
                                    "adapter merged (fastest); adapter: through the trained model with the sampling "
                                    "adapter active (one full copy less; LoRA layers add a little time).")

    @property
    def tile(self) -> tuple[int, int]:
        return (16, 16) if self.weight_tile == "16x16" else (1, 16)


@dataclass(frozen=True)
class ExploreSettings(Settings):
    """Stage 1: N seeds per prompt through the explorer in few steps."""

    prompts_per_iteration: int = setting(48, min=1, max=4096, help="P: prompts per iteration.")
    candidates: int = setting(96, min=1, max=4096, help="N: drafts per prompt.")
    steps: int = setting(6, min=1, max=1000, help="D: draft ODE steps.")
    precision: str = setting("low", choices=("low", "full"),
                             help="full: sample with the full-precision copy (naive scaling / DiffusionNFT "
                                  "baselines).")
    batch_size: int = setting(32, min=1, max=4096, help="Micro-batch for sampling.")


@dataclass(frozen=True)
class SelectSettings(Settings):
    """Which K of each prompt's N drafts are kept, by proxy reward."""

    keep: int = setting(24, min=1, max=4096, help="K: samples kept per prompt.")
    mode: str = setting("best_worst", choices=MODES,
                        help="best_worst: K/2 highest and K/2 lowest; mean_deviation: K farthest from the mean.")

    def check(self, candidates: int | None = None) -> None:
        """K against the mode and, when known, the pool size N (the one place these rules live)."""
        try:
            check_sizes(self.keep if candidates is None else candidates, self.keep, self.mode)
        except ValueError as e:
            raise self.error("keep", str(e)) from None


@dataclass(frozen=True)
class RegenerateSettings(Settings):
    """Stage 2: the kept seeds again at full precision, F steps; optionally audit the proxy ranking."""

    steps: int = setting(10, min=1, max=1000, help="F: full ODE steps.")
    batch_size: int = setting(32, min=1, max=4096, help="Micro-batch for sampling.")
    audit_every: int = setting(0, min=0, max=10**6, help="Audit the proxy ranking every this many iterations "
                                                          "(0: never).")
    audit_size: int = setting(16, min=2, max=4096, help="Drafts per prompt audited.")


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """The held-out reward: the run's held-out prompts at fixed seeds through the sampling policy."""

    steps: int = setting(10, min=1, max=1000, help="ODE steps.")
    prompts: int = setting(0, min=0, max=4096,
                           help="How many of the run's held-out prompts (Training Run's held_out) to score; 0: all.")
    per_prompt: int = setting(4, min=1, max=1024, help="Fixed seeds per prompt.")
    every: int = setting(1, min=0, max=10**6, help="Every this many iterations (0: off).")
    batch_size: int = setting(32, min=1, max=4096, help="Micro-batch for sampling.")


@dataclass(frozen=True)
class UpdateSettings(Settings):
    """The DiffusionNFT step: loss, optimizer (AdamW, no schedule) and memory."""

    lr: float = setting(3e-4, min=0.0, max=1.0, step=1e-5, help="AdamW learning rate.")
    beta: float = setting(1.0, min=1e-3, max=10.0, step=0.01, help="NFT strength (> 0: the loss divides by it).")
    kl_coef: float = setting(1e-4, min=0.0, max=10.0, step=1e-5, help="KL to the base model (0: off).")
    train_fraction: float = setting(0.6, min=0.01, max=1.0, step=0.05,
                                    help="Share of the F rollout timesteps trained per sample "
                                         "(0.6 SANA / SD3.5, 0.4 FLUX.1).")
    grad_clip: float = setting(1.0, min=0.0, max=1e6, step=0.001, help="Gradient-norm clip (SD3.5 preset: 0.002).")
    micro_batch: int = setting(8, min=1, max=4096, help="Samples per forward pass (memory).")
    gradient_checkpointing: bool = setting(False, help="Keep only block inputs in the trained forward and recompute "
                                                       "the rest in backward (less memory, about a forward more "
                                                       "time; same gradients).")
    optimizer: str = setting("adamw", choices=OPTIMIZERS,
                             help="adamw: fp32 moments (8 bytes per trained weight); adamw8bit: torchao's 8-bit "
                                  "AdamW (2 bytes; pip install -e \".[adamw8bit]\").")
    weight_decay: float = setting(1e-4, min=0.0, max=1.0, step=1e-5, help="AdamW weight decay.")
    adam_beta1: float = setting(0.9, min=0.0, max=0.999999, help="AdamW beta1.")
    adam_beta2: float = setting(0.999, min=0.0, max=0.999999, help="AdamW beta2.")
    adam_eps: float = setting(1e-8, min=0.0, max=1.0, help="AdamW epsilon.")

    def optimizer_settings(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "betas": [self.adam_beta1, self.adam_beta2],
                "eps": self.adam_eps, "kind": self.optimizer}
