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
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"device {device}: torch sees no GPU here (use device auto or cpu)")
    return torch.device(device)


def _peek(path: Path) -> dict:
    """The top-level entries of a torch checkpoint, memory-mapped (a recognizer looks at keys, not
    weights); {} for a file torch cannot read as a weights-only checkpoint."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a checkpoint: the next recognizer may take it
        return {}
    return state if isinstance(state, dict) else {}


def is_cnclip_checkpoint(path: Path) -> bool:
    from cnclip.train.checkpoint import FORMAT

    return path.is_file() and _peek(path).get("format") == FORMAT


def _state_dict_keys(state: dict) -> list[str]:
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return [k[7:] if k.startswith("module.") else k for k in state]


def is_chinese_clip_checkpoint(path: Path) -> bool:
    """cn_clip's checkpoints (its training script's and its released files) hold `bert.*` weights."""
    return path.is_file() and path.suffix != ".safetensors" and any(
        k.startswith("bert.") for k in _state_dict_keys(_peek(path)))


def _is_local_dir(path: Path) -> bool:
    return path.is_dir() and (path / "open_clip_config.json").is_file()


def load_cnclip_checkpoint(path: Path, device, architecture: Optional[str] = None) -> Encoder:
    """A `cnclip train` checkpoint (.pt): the model config, weights and vocab it carries."""
    from cnclip.train.factory import load_model_from_checkpoint, transforms

    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, _state = load_model_from_checkpoint(path, workdir, device)
    return Encoder(model.eval(), tokenizer, transforms(model)[1], device, f"cnclip-checkpoint:{path}")


def load_local_dir(path: Path, device, architecture: Optional[str] = None) -> Encoder:
    """An open_clip `local-dir:` model folder (what `cnclip export` writes, or any open_clip one):
    open_clip builds it and its tokenizer from the folder alone (an HF text tower named relative to
    the folder, as a moved export's is, pointed at the folder: open_clip resolves it from the
    working directory)."""
    import open_clip

    from cnclip.train.export import open_clip_kwargs

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device,
                                                                     **open_clip_kwargs(path))
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as err:  # noqa: BLE001 - open_clip raises many kinds on a damaged folder
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise EncoderError(f"{path}: cannot load the open_clip local-dir model ({first.strip()})") from None
    return Encoder(model.eval(), tokenizer, preprocess, device, f"local-dir:{path}")


def _signature(embed_dim: int, vision: tuple, text: tuple) -> tuple:
    return (embed_dim, vision, text)


def _state_signature(state: dict) -> tuple:
    """(embed_dim, image tower shape, text tower shape) read off a cn_clip state dict."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    if "visual.conv1.weight" in state and "visual.transformer.resblocks.0.ln_1.weight" in state:
        conv = state["visual.conv1.weight"].shape
        vision = ("vit", conv[0], count("visual.transformer.resblocks."), conv[-1])
    else:
        vision = ("rn", tuple(count(f"visual.layer{i}.") for i in range(1, 5)),
                  state["visual.conv1.weight"].shape[0] * 2 if "visual.conv1.weight" in state else None)
    text = (state["bert.embeddings.word_embeddings.weight"].shape[1], count("bert.encoder.layer."))
    return _signature(int(state["text_projection"].shape[1]), vision, text)


def _config_signature(cfg: dict) -> tuple:
    v, hf = cfg["vision_cfg"], cfg.get("hf_text_config", {})
    if isinstance(v.get("layers"), list):
        vision = ("rn", tuple(v["layers"]), v.get("width"))
    else:
        vision = ("vit", v.get("width"), v.get("layers"), v.get("patch_size"))
    return _signature(cfg["embed_dim"], vision, (hf.get("hidden_size"), hf.get("num_hidden_layers")))


def chinese_clip_architecture(state: dict, path: Path, option: str = "embed.architecture") -> str:
    """The zoo model (train/model_configs, the paper's sizes) whose shapes the checkpoint has: a
    cn_clip checkpoint records no architecture name, only its weights. `option`: where the user
    names it instead (the recipe key or the command-line option), for the error."""
    from cnclip.train.models import get_model_config, list_models

    try:
        wanted = _state_signature(state)
    except KeyError as err:
        raise EncoderError(f"{path}: not a whole Chinese-CLIP checkpoint (no {err.args[0]})") from None
    found = [name for name in list_models() if _config_signature(get_model_config(name)) == wanted]
    if len(found) != 1:
        raise EncoderError(f"{path}: cannot tell the Chinese-CLIP architecture from the checkpoint "
                           f"({'several' if found else 'no'} zoo model matches its shapes); name it "
                           f"({option}: a zoo name or an open_clip config file)")
    return found[0]


def _chinese_clip_vocab(path: Path, vocab_rows: int) -> Path:
    """vocab.txt beside the checkpoint, else cn_clip's own (the one its released models use);
    it must have as many tokens as the checkpoint has word embeddings."""
    candidates = [path.parent / "vocab.txt"]
    try:
        import cn_clip.clip

        candidates.append(Path(cn_clip.clip.__file__).parent / "vocab.txt")
    except ImportError:
        pass
    for vocab in candidates:
        if vocab.is_file() and sum(1 for _ in vocab.open(encoding="utf-8")) == vocab_rows:
            return vocab
    raise EncoderError(f"{path}: no vocab.txt of {vocab_rows} tokens beside the checkpoint (nor cn_clip's)")


@dataclass
class ChineseClipModel:
    """A Chinese-CLIP checkpoint rebuilt as its zoo model (on the CPU, in eval mode)."""

    model: object
    tokenizer: object  # a ChineseTokenizer over the checkpoint's vocab.txt, without normalization
    architecture: str  # the zoo name or config file it was built as
    model_cfg: dict  # the resolved open_clip config, as a cnclip checkpoint records it
    record: dict  # the checkpoint's own epoch / step / name, where it has them


def chinese_clip_model(path: Path, architecture: Optional[str] = None,
                       option: str = "embed.architecture") -> ChineseClipModel:
    """A Chinese-CLIP (cn_clip) checkpoint into the zoo model of its architecture (`architecture`,
    else told from its shapes), weights converted by train/models.py. Tokens are cn_clip's: the
    raw text's ids, as its own tokenizer gives them (no caption normalization)."""
    from cnclip.train.models import ModelError, create_model, get_model_config, load_clip_weights, read_state_dict
    from cnclip.train.tokenizer import ChineseTokenizer

    try:
        state = read_state_dict(path)
        name = architecture or chinese_clip_architecture(state, path, option)
        cfg = get_model_config(name)
        embeddings = state.get("bert.embeddings.word_embeddings.weight")
        if embeddings is None:  # where the architecture was named, nothing else looked for it yet
            raise EncoderError(f"{path}: not a whole Chinese-CLIP checkpoint "
                               "(no bert.embeddings.word_embeddings.weight)")
        vocab_rows = int(embeddings.shape[0])
        vocab = _chinese_clip_vocab(path, vocab_rows)
        with tempfile.TemporaryDirectory() as workdir:
            # cn_clip's ViT blocks always use QuickGELU, whatever a zoo config of the same shapes says
            # (cn-ViT-H-14 is GELU, for LAION's weights)
            vit = "visual.transformer.resblocks.0.ln_1.weight" in state
            model, model_cfg = create_model(name, vocab_size=vocab_rows, workdir=workdir, device="cpu",
                                            quick_gelu=True if vit else None)
            load_clip_weights(model, path)
    except ModelError as err:
        raise EncoderError(str(err)) from None
    tokenizer = ChineseTokenizer.from_file(vocab, cfg["text_cfg"].get("context_length", 52))
    record = {k: v for k, v in _peek(path).items() if k in ("epoch", "step", "name")}
    return ChineseClipModel(model.eval(), tokenizer, name, model_cfg, record)


def load_chinese_clip(path: Path, device, architecture: Optional[str] = None) -> Encoder:
    """A Chinese-CLIP (cn_clip) checkpoint as an Encoder (see chinese_clip_model)."""
    from cnclip.train.factory import transforms

    loaded = chinese_clip_model(path, architecture)
    model = loaded.model.to(device).eval()
    return Encoder(model, loaded.tokenizer, transforms(model)[1], device,
                   f"chinese-clip:{path} ({loaded.architecture})")


# (recognizer, loader): the first whose recognizer accepts the path loads it.
LOADERS: list[tuple[Callable[[Path], bool], Callable[..., Encoder]]] = [
    (is_cnclip_checkpoint, load_cnclip_checkpoint),
    (_is_local_dir, load_local_dir),
    (is_chinese_clip_checkpoint, load_chinese_clip),
]
KINDS = "a cnclip checkpoint .pt, an open_clip local-dir: folder or a Chinese-CLIP checkpoint"


def load_encoder(path: Union[str, Path], device: Optional[str] = None, architecture: Optional[str] = None) -> Encoder:
    """The model at `path` as an Encoder; `device`: auto (default), cpu or cuda; `architecture`:
    a Chinese-CLIP checkpoint's zoo name or config file, when its shapes do not tell it."""
    path = Path(str(path).removeprefix("local-dir:"))
    if not path.exists():
        raise EncoderError(f"{path}: no such model file or folder")
    for accepts, load in LOADERS:
        if accepts(path):
            return load(path, _device(device), architecture)
    raise EncoderError(f"{path}: not a model cnclip can load ({KINDS})")
