"""Run exported components and whole exported pipelines: numpy in, numpy out.

`OnnxModel` needs onnxruntime and numpy only; nothing on the ONNX path imports torch, which is
what an app ships. `ExecuTorchModel` runs a `.pte` through ExecuTorch's own runtime (the same
runtime a phone links), which takes torch tensors at its Python boundary. `ExportedPipeline` is the
text → image loop over either: tokenizer, classifier-free guidance (or a student's embedded
guidance), DDIM or LCM, VAE decode; or, for a one-step student exported with its `one_step`
program, that program's one call from noise and text states to the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import prompt_table
from .clip_bpe import ClipBPE
from .ddim import DDIM
from .lcm import LCM

BACKEND_FILES = {"onnx": "model.onnx", "executorch": "model.pte"}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "one_step")  # what a pipeline runs
ETDUMP_NEEDS_EXECUTORCH = "ETDump is ExecuTorch's trace: --etdump needs --backend executorch"


class OnnxModel:
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # constant-folding notes are not the user's business
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # a graph traced at fixed shapes (the int8 UNet) names them; the pipeline pads its batch to fit
        self.static_shapes = {i.name: tuple(i.shape) for i in self.session.get_inputs()
                              if all(isinstance(d, int) for d in i.shape)}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name in self.input_names:
            value = np.asarray(inputs[name])
            feed[name] = value.astype(np.int64 if "int64" in self.input_types[name] else
                                      np.float16 if "float16" in self.input_types[name] else np.float32)
        return dict(zip(self.output_names, self.session.run(None, feed)))


class ExecuTorchModel:
    """A `.pte` program; input order and output names come from the `io.json` written beside it."""

    def __init__(self, path: Path, etdump: bool = False):
        import torch
        from executorch.runtime import Runtime

        self.torch = torch
        self.program = Runtime.get().load_program(Path(path), enable_etdump=etdump)
        self.method = self.program.load_method("forward")
        io = json.loads((Path(path).parent / "io.json").read_text())
        self.input_names, self.output_names = io["inputs"], io["outputs"]
        self.static_shapes = {k: tuple(v) for k, v in io.get("shapes", {}).items()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = []
        for name in self.input_names:
            value = np.asarray(inputs[name])
            expected = self.static_shapes.get(name)
            if expected is not None and tuple(value.shape) != expected:
                raise UserError(f"ExecuTorch program takes {name} of shape {expected}, got {tuple(value.shape)}")
            tensors.append(self.torch.from_numpy(np.array(value, order="C")))  # 0-d stays 0-d
        outputs = self.method.execute(tensors)
        return {name: out.numpy() for name, out in zip(self.output_names, outputs)}

    def write_etdump(self, path: Path) -> Path:
        """The ETDump of every call since loading: per-op and per-delegate timings for ExecuTorch's Inspector."""
        self.program.write_etdump_result_to_file(str(path), None)
        return path


def load_model(path: Path, etdump: bool = False):
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxModel(path)
    if path.suffix == ".pte":
        return ExecuTorchModel(path, etdump)
    raise UserError(f"{path}: not an exported model (.onnx or .pte)")


class ExportedPipeline:
    """Text → uint8 images from an exported folder (optimum's layout), on one backend.

    SDXL (a `text_encoder_2/` beside the first): the UNet's text states are both encoders'
    penultimate layers side by side, `text_embeds` the second encoder's projected pooling and
    `time_ids` the default size conditioning (original and target size the output's, no crop); with
    `force_zeros_for_empty_prompt` the unconditional half is zeros, as diffusers does it.
    """

    def __init__(self, folder: Path, backend: str, etdump: bool = False, one_step: bool = True):
        folder = Path(folder)
        if backend not in BACKEND_FILES:
            raise UserError(f"backend '{backend}' has no exported-pipeline runner (choose onnx or executorch)")
        if etdump and backend != "executorch":
            raise UserError(ETDUMP_NEEDS_EXECUTORCH)
        file = BACKEND_FILES[backend]
        table = folder / prompt_table.FILE
        present = {name for name in COMPONENTS if (folder / name / file).exists()}
        missing = [] if table.exists() or "text_encoder" in present else ["text_encoder"]
        if "one_step" not in present or {"unet", "vae_decoder"} & present:
            missing += [name for name in ("unet", "vae_decoder") if name not in present]
        if missing:
            raise UserError(f"{folder}: not a {backend} pipeline export (missing {', '.join(f'{m}/{file}' for m in missing)})")
        self.scheduler = scheduler_from_folder(folder / "scheduler")
        used = present if one_step else present - {"one_step"}  # False: the UNet and decoder apart
        self.models = {name: load_model(folder / name / file, etdump) for name in COMPONENTS if name in used}
        self.unet, self.vae_decoder, self.one_step = (self.models.get(n) for n in ("unet", "vae_decoder", "one_step"))
        self.encoders = [(ClipBPE(folder / tokenizer), self.models[name], _read(folder / name / "config.json"))
                         for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
                         if name in self.models]
        self.table = prompt_table.PromptTable(table) if not self.encoders else None  # a fixed prompt set's states
        unet_config = _read(folder / ("unet" if self.unet else "one_step") / "config.json")
        self.latent_channels, self.latent_size = unet_config["in_channels"], unet_config["sample_size"]
        self.guidance_dim = unet_config.get("time_cond_proj_dim")  # a few-step student: guidance in its weights
        self.sdxl = len(self.encoders) == 2
        index = folder / "model_index.json"
        self.zero_negative = self.sdxl and (_read(index) if index.exists() else {}).get("force_zeros_for_empty_prompt", True)
        if self.unet is None:  # the one-step program alone
            return
        vae_config = _read(folder / "vae_decoder" / "config.json")
        self.scaling = float(vae_config.get("scaling_factor", 0.18215))
        self.unet_batch = self.unet.static_shapes.get("sample", (None,))[0]  # None: any batch
        image_size = self.latent_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.time_ids = np.array([[image_size, image_size, 0, 0, image_size, image_size]], dtype=np.float32)
        known = {"sample", "timestep", "encoder_hidden_states"} | ({"timestep_cond"} if self.guidance_dim else set()) | (
            {"text_embeds", "time_ids"} if self.sdxl else set())
        extra = [n for n in self.unet.input_names if n not in known]
        if extra:
            raise UserError(f"{folder}: the exported-pipeline runner handles SD-1.x/2.x and SDXL UNets fed by their "
                            f"text encoders; this one also takes {', '.join(extra)} (an SDXL UNet needs text_encoder_2/)")

    def write_etdumps(self, out: Path) -> list[Path]:
        """One `<component>.etdp` per component, covering every call so far."""
        out.mkdir(parents=True, exist_ok=True)
        return [model.write_etdump(out / f"{name}.etdp") for name, model in self.models.items()]

    def initial_latents(self, count: int, seed: int) -> np.ndarray:
        """Prompt i's starting noise from its own generator seeded `seed + i` (numpy's PCG64)."""
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        return np.stack([np.random.default_rng(seed + i).standard_normal(shape, dtype=np.float32)
                         for i in range(count)])

    def conditions(self, prompt: str) -> dict[str, np.ndarray]:
        """The UNet's text conditions for one prompt, batch one: `encoder_hidden_states` (and SDXL's two)."""
        if self.table is not None:
            return self.table.conditions(prompt)
        outputs = [encoder({"input_ids": np.array([tokenizer.encode(prompt)], dtype=np.int64)})
                   for tokenizer, encoder, _ in self.encoders]
        if not self.sdxl:
            return {"encoder_hidden_states": outputs[0]["last_hidden_state"]}
        penultimate = [out[f"hidden_states.{config['num_hidden_layers'] - 1}"]
                       for out, (_, _, config) in zip(outputs, self.encoders)]
        return {"encoder_hidden_states": np.concatenate(penultimate, axis=-1), "text_embeds": outputs[1]["text_embeds"],
                "time_ids": self.time_ids}

    def negative_conditions(self, cond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The unconditional half of a guided step: the empty prompt's, or SDXL's zeros beside `cond`'s size."""
        if self.zero_negative:
            return {k: v if k == "time_ids" else np.zeros_like(v) for k, v in cond.items()}
        return self.conditions("")

    def __call__(self, prompts: list[str], steps: int, guidance: float, seed: int = 0,
                 latents: np.ndarray | None = None, noise: list | None = None) -> np.ndarray:
        """uint8 images, prompt i from `latents[i]` (else its seeded noise). `noise[i]`: the source of the noise
        an LCM sampler adds between steps (anything with numpy's `standard_normal(shape, dtype=)`, so another
        runtime's draws can be replayed); by default numpy's generator seeded [seed + i, 1]."""
        return np.stack([self._one(p, steps, guidance, latents[i] if latents is not None else
                                   self.initial_latents(1, seed + i)[0],
                                   noise[i] if noise is not None else np.random.default_rng([seed + i, 1]))
                         for i, p in enumerate(prompts)])

    def _unet(self, batch: dict[str, np.ndarray], t) -> np.ndarray:
        """One UNet call on batched inputs; a graph traced at a fixed batch (ExecuTorch, int8 ONNX) gets its batch
        by padding or splitting."""
        count, fixed = len(batch["sample"]), self.unet_batch
        if fixed is None or fixed == count:
            return self.unet({**batch, "timestep": np.array(t, dtype=np.float32)})["out_sample"]
        if fixed > count:
            repeat = -(-fixed // count)
            return self._unet({k: np.concatenate([v] * repeat)[:fixed] for k, v in batch.items()}, t)[:count]
        return np.concatenate([self._unet({k: v[i:i + fixed] for k, v in batch.items()}, t)
                               for i in range(0, count, fixed)])

    def _one(self, prompt: str, steps: int, guidance: float, latent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cond = self.conditions(prompt)
        if self._in_one_call(steps, guidance):
            inputs = {"sample": latent[None].astype(np.float32), **cond, "guidance": np.array(guidance, dtype=np.float32)}
            return _uint8(self.one_step(inputs)["image"][0])
        embedded = guidance_embedding(guidance, self.guidance_dim) if self.guidance_dim else None
        guided = guidance > 1.0 and embedded is None  # a student with guidance inside needs no unconditional pass
        if guided:
            cond = {k: np.concatenate([v, cond[k]]) for k, v in self.negative_conditions(cond).items()}
        if embedded is not None:
            cond["timestep_cond"] = embedded
        x = latent[None].astype(np.float32)
        for t in self.scheduler.timesteps(steps):
            out = self._unet({"sample": np.concatenate([x, x]) if guided else x, **cond}, t)
            eps = out[:1] + guidance * (out[1:] - out[:1]) if guided else out
            x = self.scheduler.step(eps, int(t), x, steps, rng)
        return _uint8(self.vae_decoder({"latent_sample": x / self.scaling})["sample"][0])

    def _in_one_call(self, steps: int, guidance: float) -> bool:
        """Whether the one-step program makes this image: one step, and guidance it computes (embedded, or none)."""
        if self.one_step is not None and steps == 1 and (self.guidance_dim or guidance <= 1.0):
            return True
        if self.unet is None:
            raise UserError("this export has only the one-step program: it samples in 1 step"
                            + ("" if self.guidance_dim else " without guidance (--guidance 1)"))
        return False


def _uint8(image: np.ndarray) -> np.ndarray:
    """A decoder's (3, H, W) image in [-1, 1] as (H, W, 3) uint8."""
    return (np.clip(image.transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def scheduler_from_folder(folder: Path) -> DDIM | LCM:
    return scheduler_from_config(_read(Path(folder) / "scheduler_config.json"))


def scheduler_from_config(config: dict) -> DDIM | LCM:
    """The numpy sampler for a scheduler config: LCM's for LCMScheduler, deterministic DDIM for the rest."""
    return LCM(config) if config.get("_class_name") == "LCMScheduler" else DDIM(config)


def one_step_affine(scheduler: DDIM | LCM) -> tuple[int, float, float]:
    """The one-step sampler as numbers: its timestep t, and its step x → keep·x + weight·output.

    A single DDIM step, and LCM's last (it adds no noise), is affine in the sample and the UNet's
    output for every prediction type, so a one-step program computes it in its graph with the
    scheduler's own coefficients, read here from the numpy sampler itself. A step that is not
    affine (DDIM's `clip_sample`) is refused.
    """
    t = int(scheduler.timesteps(1)[0])
    zero, one = np.zeros(1, dtype=np.float32), np.ones(1, dtype=np.float32)
    keep, weight = float(scheduler.step(zero, t, one, 1)[0]), float(scheduler.step(one, t, zero, 1)[0])
    x, output = 4 * np.random.default_rng(0).standard_normal((2, 64), dtype=np.float32)
    if not np.allclose(scheduler.step(output, t, x, 1), keep * x + weight * output, rtol=1e-4, atol=1e-4):
        raise UserError("this scheduler's one step is not affine in the sample and the UNet's output "
                        "(clip_sample?): no one-step program; export the unet and vae_decoder")
    return t, keep, weight


def guidance_embedding(guidance: float, dim: int) -> np.ndarray:
    """`guidance − 1` embedded as diffusers' pipelines feed a guidance-distilled UNet, shape (1, dim)."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(np.log(10000.0) / (half - 1))).astype(np.float32)
    angles = np.float32((guidance - 1.0) * 1000.0) * freqs
    emb = np.concatenate([np.sin(angles), np.cos(angles)]).astype(np.float32)
    return np.pad(emb, (0, dim % 2))[None]
