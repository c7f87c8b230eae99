"""pocketdiff: turn a text-to-image diffusion model into something a phone runs.

Importing the package switches the Hugging Face libraries to offline mode: every model
comes from a local folder, and a stray hub download must fail loudly instead of stalling.
"""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars; our own stages show rich progress
os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass bars; read when tqdm is first imported
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Optional CUDA kernels of torchao and a torch deprecation notice it triggers are noise on every CPU run.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
