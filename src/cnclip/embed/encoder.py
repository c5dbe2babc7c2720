"""A local Chinese CLIP model as an encoder: texts and PIL images in, L2-normalized embeddings out.

One loader per kind of model file (`LOADERS`); `load_encoder` picks by what the path holds, so the
embed stage, search and scoring never care where a model came from. Batched; bf16 autocast on a
GPU, fp32 on CPU (bf16 on CPU is slower than fp32 in torch's CPU kernels).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from cnclip._common.errors import CnclipError


class EncoderError(CnclipError, ValueError):
    """The model path is missing or holds no model cnclip can load."""


@dataclass
class Encoder:
    model: object  # a torch CLIP module in eval mode, with encode_image / encode_text
    tokenizer: Callable[[Sequence[str]], object]
    transform: Callable  # PIL image -> CHW tensor (the model's eval preprocessing)
    device: object  # torch.device
    name: str  # what was loaded, for the artifact's record

    @property
    def precision(self) -> str:
        return "bf16" if self.device.type == "cuda" else "fp32"

    def _autocast(self):
        import torch

        from cnclip.train.evaluate import autocast

        return torch.no_grad(), autocast(self.device, self.precision)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """[len(texts), dim] float32, each row of unit length."""
        import torch

        out = []
        grad, cast = self._autocast()
        with grad, cast:
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def encode_pixels(self, pixels) -> np.ndarray:
        """A preprocessed [n, 3, H, W] batch -> [n, dim] float32 of unit length."""
        grad, cast = self._autocast()
        with grad, cast:
            return self.model.encode_image(pixels.to(self.device), normalize=True).float().cpu().numpy()

    def encode_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """[len(images), dim] float32 of PIL images, each row of unit length."""
        import torch

        out = [self.encode_pixels(torch.stack([self.transform(im.convert("RGB")) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @cached_property
    def dim(self) -> int:
        """The embedding width (read off one encoded text: every kind of model has one)."""
        return int(self.encode_texts(["维度"]).shape[1])


def _device(device: Optional[str]):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_cnclip_checkpoint(path: Path, device) -> Encoder:
    """A `cnclip train` checkpoint (.pt): the model config, weights and vocab it carries."""
    from cnclip.train.factory import load_model_from_checkpoint, transforms

    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, _state = load_model_from_checkpoint(path, workdir, device)
    return Encoder(model.eval(), tokenizer, transforms(model)[1], device, f"cnclip-checkpoint:{path}")


# (recognizer, loader): the first whose recognizer accepts the path loads it.
LOADERS: list[tuple[Callable[[Path], bool], Callable[[Path, object], Encoder]]] = [
    (lambda p: p.is_file() and p.suffix == ".pt", load_cnclip_checkpoint),
]


def load_encoder(path: Union[str, Path], device: Optional[str] = None) -> Encoder:
    """The model at `path` as an Encoder; `device`: auto (default), cpu or cuda."""
    path = Path(path)
    if not path.exists():
        raise EncoderError(f"{path}: no such model file or folder")
    for accepts, load in LOADERS:
        if accepts(path):
            return load(path, _device(device))
    raise EncoderError(f"{path}: not a model cnclip can load (a cnclip checkpoint .pt)")
