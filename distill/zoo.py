"""Train pocketdiff's embedded default: a small model with Stable Diffusion's exact component structure.

The teacher is a stock diffusers `StableDiffusionPipeline` folder (CLIP tokenizer, CLIPTextModel,
AutoencoderKL, UNet2DConditionModel with SD's block types, a scheduler), scaled down so it trains
on a CPU. Training runs in phases (tokenizer → VAE → latents → UNet with its text encoder), each
resumable: a finished phase is recognised by its saved output, an interrupted one restarts from its
last checkpoint. Every number comes from the seed, so the shipped weights can be reproduced.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from ..stockformat import make_stock_pipeline
from . import scenes, tokenizer
from .conditions import token_ids
from .latents import encode_images
from .trainer import Trainer, TrainConfig, epoch_batches

RESOLUTION = scenes.RESOLUTION
TOKENS = 16  # every caption fits (at most 13 tokens); 77 would make the text encoder cost more than the UNet
CAPTION_DROPOUT = 0.1  # empty-prompt training so classifier-free guidance works
MIN_SNR = 5.0  # min-SNR-γ loss weighting (Hang et al. 2023): the low-noise steps stop dominating the gradient
READER_WEIGHT = 0.1  # weight of the caption-reading loss that keeps prompts apart in the text encoder


class DefaultTrainConfig(BaseModel):
    """Budgets of each phase; `quick()` is the seconds-long variant the tests run."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 1e-3
    unet_steps: list[int] = [3000, 5000, 7500]  # cumulative ends of cosine cycles; each cycle resumes the last
    unet_batch: int = 128
    unet_lr: float = 5e-4
    ema_decay: float = 0.995
    scenes: int = 50_000  # the training pool: the first N scenes of the seeded stream, rendered once

    @classmethod
    def quick(cls, seed: int = 0) -> "DefaultTrainConfig":
        return cls(seed=seed, vae_steps=4, vae_batch=8, unet_steps=[2, 4], unet_batch=8, scenes=64)


def text_encoder_config(vocab: dict[str, int]):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=vocab[tokenizer.BOS], eos_token_id=vocab[tokenizer.EOS], pad_token_id=vocab[tokenizer.EOS],
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
    )


def build_unet():
    """SD-1.x's UNet layout (3 cross-attention stages + 1 plain, mid block, 2 layers per block) at 1/10 width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128), attention_head_dim=4, cross_attention_dim=128,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def scheduler_config() -> dict:
    """SD-1.x's noise schedule; DDIM with trailing spacing so that 1–4 step sampling starts at t=999."""
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "trailing",
    }


def train_vae(images: torch.Tensor, config: DefaultTrainConfig, work: Path):
    vae = build_vae()
    pick = epoch_batches(len(images), config.vae_batch, config.seed)

    def loss_fn(batch, generator):
        posterior = vae.encode(batch["x"]).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator,
                                                           device=posterior.mean.device)
        recon = vae.decode(z).sample
        l1 = (recon - batch["x"]).abs().mean()
        mse = (recon - batch["x"]).pow(2).mean()
        kl = posterior.kl().mean() / batch["x"][0].numel()
        return {"loss": l1 + mse + 1e-4 * kl, "l1": l1, "mse": mse, "kl": kl}

    train_config = TrainConfig(steps=config.vae_steps, lr=config.vae_lr, warmup_steps=min(50, config.vae_steps // 10),
                               checkpoint_every=100, seed=config.seed)
    trainer = Trainer(vae, loss_fn, lambda step: {"x": images[pick(step)]}, train_config, work / "vae", "vae").run()
    vae.load_state_dict(trainer.ema_state_dict())
    return vae.eval()


class CaptionReader(torch.nn.Module):
    """Reads every token of the caption back from the text encoder's last state (training only).

    Trained by the diffusion loss alone, the from-scratch text encoder maps prompts that differ in
    binding or placement ("a red square and a blue circle", "a circle left of a square") to nearly the
    same states, and the UNet draws the same image for both. Asking the last state, which attends to
    the whole caption, to spell the caption out keeps every prompt distinct from the first steps on.
    """

    def __init__(self, width: int, vocab: int, tokens: int):
        super().__init__()
        self.position = torch.nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.head = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                        torch.nn.Linear(2 * width, vocab))

    def forward(self, last_state: torch.Tensor) -> torch.Tensor:
        return self.head(last_state[:, None, :] + self.position[None])  # (batch, tokens, vocab) logits


class TextToImage(torch.nn.Module):
    """The UNet and its text encoder, optimised together (the text encoder is trained from scratch), with the
    caption reader beside them; only the first two are saved."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        config = text_encoder.config
        self.reader = CaptionReader(config.hidden_size, config.vocab_size, config.max_position_embeddings)


def train_unet(latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], tok, vae_scale: float,
               config: DefaultTrainConfig, work: Path):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    model = TextToImage(build_unet(), CLIPTextModel(text_encoder_config(tok.get_vocab())))
    noise_schedule = DDPMScheduler.from_config(scheduler_config())
    alphas = noise_schedule.alphas_cumprod
    ids, empty = token_ids(tok, captions), token_ids(tok, [""])[0]
    mean, std = latents
    pick = epoch_batches(len(captions), config.unet_batch, config.seed)

    def batch_for(step):
        index = pick(step)
        return {"mean": mean[index], "std": std[index], "ids": ids[index]}

    def loss_fn(batch, generator):
        device = batch["mean"].device
        shape = batch["mean"].shape
        z = (batch["mean"] + batch["std"] * torch.randn(shape, generator=generator, device=device)) * vae_scale
        drop = torch.rand(shape[0], generator=generator, device=device) < CAPTION_DROPOUT
        input_ids = torch.where(drop[:, None], empty.to(device), batch["ids"])
        t = torch.randint(0, len(alphas), (shape[0],), generator=generator, device=device)
        noise = torch.randn(shape, generator=generator, device=device)
        a = alphas.to(device)[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        text = model.text_encoder(input_ids).last_hidden_state
        pred = model.unet(noisy, t, text).sample
        snr = a.view(-1) / (1 - a.view(-1))
        weight = snr.clamp(max=MIN_SNR) / snr
        diffusion = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        logits = model.reader(text[:, -1].float())
        reading = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten())
        return {"loss": diffusion + READER_WEIGHT * reading, "diffusion": diffusion, "reading": reading}

    for end in config.unet_steps:  # warm restarts: a new cosine cycle that resumes the previous one's checkpoint
        train_config = TrainConfig(steps=end, lr=config.unet_lr, warmup_steps=min(100, config.unet_steps[0] // 10),
                                   ema_decay=config.ema_decay, checkpoint_every=100, seed=config.seed)
        trainer = Trainer(model, loss_fn, batch_for, train_config, work / "unet", f"unet (to step {end})").run()
    model.load_state_dict(trainer.ema_state_dict())
    return model.unet.eval(), model.text_encoder.eval()


def train_default(out: Path, config: DefaultTrainConfig, work: Path | None = None) -> Path:
    """Train every component and write a stock `StableDiffusionPipeline` folder (fp16 safetensors) to `out`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    timings_file = work / "timings.json"  # summed over resumed runs, so the record is the whole training time
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def spent(phase: str, began: float) -> None:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - began
        timings_file.write_text(json.dumps(timings))

    train = scenes.training_set(config.scenes, config.seed)
    images = train.tensors()

    began = time.perf_counter()
    tokenizer.build_clip_tokenizer_files(scenes.vocabulary_captions(), work / "tokenizer", max_length=TOKENS)
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
    spent("tokenizer_s", began)

    began = time.perf_counter()
    if (work / "vae_final" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(work / "vae_final", dtype=torch.float32).eval()
    else:
        vae = train_vae(images, config, work)
        mean, std = encode_images(vae, images)
        sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(config.seed))
        vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
        vae.save_pretrained(work / "vae_final")
    spent("vae_s", began)

    began = time.perf_counter()
    latents = encode_images(vae, images)
    unet, text_encoder = train_unet(latents, train.captions, tok, vae.config.scaling_factor, config, work)
    spent("unet_s", began)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    make_stock_pipeline(out)  # fp16 files that load as float32 under transformers 4 and 5 alike
    for name in ("vocab.json", "merges.txt"):  # CLIP's own files, which Apple's Swift tokenizer reads
        shutil.copy(work / "tokenizer" / name, out / "tokenizer" / name)
    record = {"config": config.model_dump(), "train_images": len(train), "timings": timings,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() else "cpu"}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return out
