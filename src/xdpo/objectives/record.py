"""The objective record: what the training recipe asks an objective instead of comparing its name.

The recipe reads only these traits (docs/design.md §2):
- `loss(inp, **params)`: a pure function of per-image errors (`LossInput`) -> `LossOutput`;
- `params`: the `loss.*` config keys passed to it as keyword arguments;
- `needs_reference`: whether a reference forward runs (and whether a reference copy is made at all);
- `noise`: "pair" (one (t, eps) per pair, shared by w and l), "image" (one per image) or "group" (one per
  rollout group, shared by its K images; the micro-batches then hold whole groups);
- `data`: the kinds of data it trains on: `data.format` values ("pairs", "images"), or "rollouts" (online
  rounds of groups of K images per prompt with rewards and advantages, `online.enabled`);
- `uses_labels`: it reads soft labels (ties kept as 0.5), so `data.ties=keep` is meaningful;
- `needs_t`: it reads the noise level of each image (`LossInput.sigma`; step-aware objectives);
- `state`: a factory of its running state (e.g. Diffusion-KTO's reference-point window), saved with
  checkpoints, or None;
- `check(cfg)`: its cross-field config rules (one `ConfigError` line), or None;
- `options`: its own config keys, the section `<name>.*` (`xdpo.config.options.Option`);
- `predictions`: it reads the predictions themselves (`LossInput.pred`, `target`, `ref_pred`,
  `init_pred`, `x0_scale`), not only the errors (DiffusionNFT's implicit policies mix them);
- `initial(params)`: whether it needs the initial model's prediction (`LossInput.init_pred`; KL-to-base
  terms), given its parameters;
- `timesteps(n, params, rng)`: rollouts: the positions on the rollout sampler's grid of n steps that one
  draw unit (an image, or a group for `noise="group"`) is trained at in its round, or None (the run's
  timestep sampler, one draw per unit);
- `samples_with`: the model that samples its rollouts: "policy" or "reference" (DiffusionNFT's old policy).
- `likelihood`: for objectives on per-step log-probabilities of a stochastic sampler (grpo, dpok, d3po),
  which sampler steps are stochastic and trained, its noise, and whether the reference's step is needed
  (`xdpo.objectives.likelihood.Likelihood`); None for the others.
- `losers`: where the losing image of each pair comes from: "data" (the batch's own), or "reference" (a
  sample the reference model draws for the caption at the step, SePPO: the data's preferred images only);
- `scale(cfg)`: (the key, its value) of the factor that turns its reward difference into logits
  (default `loss.beta`; MaPO's kappa), logged as the effective beta = scale x mean lambda(t); None
  when its loss has none (SFT).
A new objective is one module defining such a record plus one line in `registry.OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.likelihood import Likelihood
from xdpo.objectives.output import LossOutput


class ObjectiveState(Protocol):
    """Running state of an objective across steps (saved in checkpoints as JSON)."""

    def state(self) -> Any: ...

    def load(self, value: Any) -> None: ...


def _identity(x: Tensor) -> Tensor:
    return x


def _never(params: dict[str, Any]) -> bool:
    return False


@dataclass
class LossInput:
    """Per-image errors of one micro-batch and what an objective may need besides them.

    Pair data: images are [w_1..w_B; l_1..l_B] (N = 2B); per-image data: N independent images.
    `label`: pairs -> P(w preferred) per pair [B] (1 = ordinary pair, 0.5 = kept tie); images ->
    1 desirable / 0 undesirable per image [N]. Both may live on the CPU (reading them costs no sync).
    `weight`: lambda(t) per noise draw ([B] for pair noise, [N] for image noise) or None (= 1).
    """

    err: Tensor  # [N] e_theta, float32
    ref: Tensor | None  # [N] e_ref (None when the objective needs no reference)
    pairs: bool
    label: Tensor | None = None
    weight: Tensor | None = None
    t: Tensor | None = None  # [N] integer timestep indices (larger = noisier)
    sigma: Tensor | None = None  # [N] noise level in [0, 1] (flow sigma, or sqrt(1 - abar) for DDPM)
    state: Any = None  # the objective's running state (`Objective.state`), if any
    gather: Callable[[Tensor], Tensor] = field(default=_identity)  # across processes
    # rollouts (`Objective.data` "rollouts"): per image
    advantage: Tensor | None = None  # [N] group advantage of the image's reward (xdpo.rollout.advantages)
    group: Tensor | None = None  # [N] its group within the micro-batch (0..G-1; groups are whole)
    # `Objective.predictions`: the predictions themselves [N, C, h, w] and the x0 scale
    pred: Tensor | None = None  # the policy's (with autograd)
    target: Tensor | None = None  # the regression target (eps, v, x0 or flow velocity)
    ref_pred: Tensor | None = None  # the reference's (no autograd), when it needs one
    init_pred: Tensor | None = None  # the initial model's (no autograd), when `Objective.initial` says so
    init_err: Tensor | None = None  # [N] its errors e_initial
    x0_scale: Tensor | None = None  # [N] c with x0_hat - x0 = -c (pred - target) (flow: sigma)
    # `Objective.likelihood`: rows = (image, recorded sampler step), the step's Gaussian transition
    log_prob: Tensor | None = None  # [N] log p_theta(x' | x), with autograd (xdpo.models.sde.log_prob)
    old_log_prob: Tensor | None = None  # [N] as recorded when sampling (the old policy's)
    ref_log_prob: Tensor | None = None  # [N] the reference's, when `Likelihood.reference` says so
    step_mean: Tensor | None = None  # [N, ...] the policy's Gaussian mean, with autograd
    ref_step_mean: Tensor | None = None  # [N, ...] the reference's
    step_std: Tensor | None = None  # [N] the transition's std

    @property
    def rows(self) -> int:
        return self.err.shape[0] // 2 if self.pairs else self.err.shape[0]


def beta_scale(cfg: Any) -> tuple[str, float]:
    """The logits' scale of most objectives: `loss.beta`."""
    return "loss.beta", float(cfg.loss.beta)


@dataclass(frozen=True)
class Objective:
    name: str
    about: str
    loss: Callable[..., LossOutput]
    params: tuple[str, ...] = ()
    needs_reference: bool = True
    noise: str = "pair"
    data: tuple[str, ...] = ("pairs",)
    uses_labels: bool = False
    needs_t: bool = False
    state: Callable[[int], ObjectiveState] | None = None  # factory(images per optimizer step, all processes)
    check: Callable[[Any], None] | None = None
    options: tuple[Option, ...] = ()
    predictions: bool = False
    initial: Callable[[dict[str, Any]], bool] = _never
    timesteps: Callable[[int, dict[str, Any], Any], Sequence[int]] | None = None
    samples_with: str = "policy"
    losers: str = "data"
    scale: Callable[[Any], tuple[str, float]] | None = beta_scale
    likelihood: Likelihood | None = None
