"""One-step distillation by distribution matching (DMD, Yin et al. 2024, with DMD2's two time-scale rule).

Why DMD rather than adversarial distillation (ADD/LADD): its second network, the fake score, is the
teacher's own architecture trained with the plain denoising loss, so there is no discriminator head
and GAN balance to tune on features of an 8 M-parameter model; and regression to the teacher's own
samples (DMD's guard against mode collapse) gives a strong signal from the first step, which is what
a CPU budget of hundreds of steps needs.

The generator is the student (the teacher plus LCM's guidance input) sampled exactly as diffusers'
`LCMScheduler` samples it: x̂0 = c_skip·x + c_out·x̂0(UNet), re-noised with fresh noise to the next
timestep. Each training sample picks one of the 1-, 2- and 4-step chains and a position in it, and
reaches that position by running the generator itself (DMD2's backward simulation), so training
sees the inputs inference will. Every step:
- the fake score network learns the denoising loss on the generator's detached samples, so it
  tracks the generator's distribution;
- on generator steps (every `fake_updates`-th), the generator gets the distribution-matching
  gradient, fake x̂0 − guided-teacher x̂0 at a random noise level normalised by |x̂0 − teacher x̂0|,
  plus `regression_weight` × the MSE to the guided teacher's ODE sample of the same noise.
Both networks sit in one module under the shared trainer: their losses touch disjoint parameters,
so one backward and one optimiser step update both, and one checkpoint resumes both exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .diffusion import (GuidedTeacher, alpha_at, as_column, consistency_output, ddim_to, guidance_embedding,
                        output_for, with_guidance_input, x0_and_eps)
from .pairs import OneStep, Pairs, pair_batches, pair_regression, teacher_pairs
from .step_common import BatchParts, StepDistillConfig, train_round
from .trainer import Trainer

CHAINS = (1, 2, 4)  # the step counts the student is trained to sample in (LCMScheduler's timesteps for each)


def chain_table(scheduler) -> torch.Tensor:
    """Row per chain in CHAINS: LCMScheduler's timesteps for that step count, padded with −1."""
    rows = []
    for n in CHAINS:
        scheduler.set_timesteps(n)
        rows.append(scheduler.timesteps.tolist() + [-1] * (max(CHAINS) - n))
    return torch.tensor(rows)


class DMDLoss:
    """One DMD step: the fake score's denoising loss always; the generator's terms on generator steps."""

    def __init__(self, pipe, networks: torch.nn.ModuleDict, alphas: torch.Tensor, final_alpha: float,
                 pairs: Pairs, chains: torch.Tensor, config: StepDistillConfig):
        self.networks, self.alphas, self.final_alpha, self.config = networks, alphas, final_alpha, config
        self.prediction = pipe.scheduler.config.prediction_type
        self.teacher = GuidedTeacher(pipe.unet, self.prediction)
        self.parts, self.chains = BatchParts(pipe, config), chains
        self.pair_rows = pair_batches(pairs, config.batch, config.seed + 1)
        self.one_step = OneStep(networks["generator"], alphas, final_alpha, self.prediction, int(chains[0, 0]))
        self.last: dict[str, torch.Tensor] = {"distribution": torch.tensor(0.0), "regression": torch.tensor(0.0)}
        unet_config = networks["generator"].config
        self.dim, self.shape = unet_config.time_cond_proj_dim, (unet_config.in_channels, *[unet_config.sample_size] * 2)

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return alpha_at(self.alphas, self.final_alpha, t)

    def _generate(self, x: torch.Tensor, t: torch.Tensor, text: dict, cond: torch.Tensor) -> torch.Tensor:
        """The generator's denoised sample at (x, t): what LCMScheduler.step computes from its output."""
        out = self.networks["generator"](x, t, **text, timestep_cond=cond).sample.float()
        return consistency_output(out, x, t, self._alpha(t), self.prediction)

    @torch.no_grad()
    def _simulate(self, text, cond, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's input at a random position of a random chain, reached by sampling the generator."""
        device, n = cond.device, cond.shape[0]
        chains = self.chains.to(device)
        chain = torch.randint(0, len(CHAINS), (n,), generator=generator, device=device)
        lengths = torch.tensor(CHAINS, device=device)[chain]
        position = (torch.rand(n, generator=generator, device=device) * lengths).long()
        shape = (n, *self.shape)
        x = torch.randn(shape, generator=generator, device=device)
        for j in range(int(position.max())):
            t, t_next = chains[chain, j], chains[chain, j + 1]
            moved = ddim_to(self._generate(x, t, text, cond), torch.randn(shape, generator=generator, device=device),
                            self._alpha(t_next))
            x = torch.where(as_column(position > j), moved, x)
        return x, chains[chain, position]

    def _fake_out(self, x, t, text, cond) -> torch.Tensor:
        return self.networks["fake"](x, t, **text, timestep_cond=cond).sample.float()

    def __call__(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        config = self.config
        _, text, empty, guidance = self.parts.draw(batch, generator)
        device, n = guidance.device, guidance.shape[0]
        cond = guidance_embedding(guidance, self.dim)
        x, t = self._simulate(text, cond, generator)
        generator_step = batch["step"] % config.fake_updates == 0
        with torch.set_grad_enabled(generator_step):
            x0 = self._generate(x, t, text, cond)

        s = torch.randint(0, len(self.alphas), (n,), generator=generator, device=device)
        a_s = self._alpha(s)
        x_s = ddim_to(x0.detach(), torch.randn(x0.shape, generator=generator, device=device), a_s)
        fake = (self._fake_out(x_s, s, text, cond) - output_for(x0.detach(), x_s, a_s, self.prediction)).pow(2).mean()
        terms = {"fake": fake.detach()}
        loss = fake
        if generator_step:
            s = torch.randint(config.dm_min_step, config.dm_max_step + 1, (n,), generator=generator, device=device)
            a_s = self._alpha(s)
            x_s = ddim_to(x0.detach(), torch.randn(x0.shape, generator=generator, device=device), a_s)
            with torch.no_grad():
                real_x0 = self.teacher(x_s, s, a_s, text, empty, guidance)[0]
                fake_x0 = x0_and_eps(self._fake_out(x_s, s, text, cond), x_s, a_s, self.prediction)[0]
                scale = (x0.detach() - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
                target = x0.detach() - (fake_x0 - real_x0) / scale
            distribution = 0.5 * (x0 - target).pow(2).mean()
            loss = loss + distribution
            self.last = {"distribution": distribution.detach(), "regression": torch.tensor(0.0, device=device)}
            if config.regression_weight:
                loss = loss + config.regression_weight * self._regression(batch["step"], device)
        return {"loss": loss, **terms, **self.last}

    def _regression(self, step: int, device) -> torch.Tensor:
        """MSE between the 1-step generator and the guided teacher's ODE sample of the same noise."""
        regression = pair_regression(self.one_step, self.parts.conditions,
                                     {k: v.to(device) for k, v in self.pair_rows(step).items()})
        self.last["regression"] = regression.detach()
        return regression


def train_dmd(pipe, teacher_folder: Path, student, latents, batch_for, alphas: torch.Tensor, final_alpha: float,
              scheduler, config: StepDistillConfig, out: Path, identity: dict) -> dict:
    """Train `student` (in place) as DMD's generator; the run's figures."""
    pairs = teacher_pairs(pipe, teacher_folder, latents.captions, alphas, final_alpha, config)
    fake = with_guidance_input(pipe.unet).train().requires_grad_(True)
    networks = torch.nn.ModuleDict({"generator": student, "fake": fake})
    loss = DMDLoss(pipe, networks, alphas, final_alpha, pairs, chain_table(scheduler), config)
    train = config.train_config(config.steps, config.lr, config.ema_decay)
    trainer = Trainer(networks, loss, lambda step: {**batch_for(step), "step": step}, train, out, "dmd", identity)
    figures = train_round(trainer, pipe, out, 1)
    weights = trainer.ema_state_dict()
    student.load_state_dict({k.removeprefix("generator."): v for k, v in weights.items() if k.startswith("generator.")})
    return {**figures, "regression_pairs": len(pairs)}
