"""Translation backends of the translate stage: each a small class with one
`translate(texts) -> list[str | None]` (None: no translation for that text), chosen by name from
BACKENDS, and an `identity` that names what it translates with in the cache's key.

- `hf`: a local seq2seq model folder (an opus-mt English->Chinese model, say) through
  transformers, batched `generate`, in bfloat16 on a GPU when there is one, float32 on the CPU;
- `ctranslate2`: a model folder converted by CTranslate2's converter, the Hugging Face tokenizer
  files beside it (the converter's `--copy_files`, or copied in);
- `command`: the user's program, started once per batch: JSONL `{"id", "text"}` on its stdin, JSONL
  `{"id", "text"}` on its stdout; an id it leaves out is a caption without translation.

Model files are never downloaded: everything loads from the local folder the recipe names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Optional

from cnclip._common.errors import CnclipError
from cnclip._common.library_log import library_log
from cnclip.corpus.recipe.translate import TranslateSettings
from cnclip.corpus.runtime.state import fingerprint

# Files up to this size are hashed whole in a model's identity; larger ones (the weights) by their
# size, head and tail, so a multi-GB model costs a few reads, not a full pass, on every build.
_WHOLE_FILE = 16 << 20
_EDGE = 1 << 20


class TranslateError(CnclipError, RuntimeError):
    """A backend that cannot load or run (a folder that is no model, a command that failed)."""


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as stream:
        if size <= _WHOLE_FILE:
            digest.update(stream.read())
        else:
            digest.update(stream.read(_EDGE))
            stream.seek(size - _EDGE)
            digest.update(stream.read(_EDGE))
    return digest.hexdigest()


def folder_identity(folder: str) -> list:
    """[relative name, digest] of every file under a model folder: the same files copied elsewhere
    give the same identity (a cache shared between machines still hits), a changed file another."""
    root = Path(folder)
    return [[str(path.relative_to(root)), _file_digest(path)] for path in sorted(root.rglob("*")) if path.is_file()]


def resolve_device(device: str) -> str:
    """auto: the GPU when torch sees one; cuda asked for on a machine without one is the user's to fix."""
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise TranslateError("translate.device: cuda, but no CUDA device is visible to torch")
    return "cuda" if device == "cuda" or (device == "auto" and available) else "cpu"


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a folder it cannot read
        raise TranslateError(f"translate.model: {folder}: no tokenizer loads from it "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


class HfBackend:
    """transformers AutoTokenizer + AutoModelForSeq2SeqLM from the local folder."""

    def __init__(self, settings: TranslateSettings):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.tokenizer = _load_tokenizer(settings.model)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(settings.model, dtype=dtype, local_files_only=True)
        except Exception as err:
            raise TranslateError(f"translate.model: {settings.model}: not a seq2seq model folder transformers "
                                 f"loads ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                 ) from None
        self.model = model.to(self.device).eval()

    @staticmethod
    def identity(settings: TranslateSettings) -> list:
        return ["hf", folder_identity(settings.model), settings.max_new_tokens]

    def translate(self, texts: list[str]) -> list[Optional[str]]:
        """Greedy decoding, `batch_size` texts per generate call (padded to the longest of the batch)."""
        import torch

        out: list[Optional[str]] = []
        size = self.settings.batch_size
        for start in range(0, len(texts), size):
            batch = self.tokenizer(texts[start:start + size], return_tensors="pt", padding=True, truncation=True)
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            with torch.inference_mode():
                ids = self.model.generate(**batch, max_new_tokens=self.settings.max_new_tokens, num_beams=1,
                                          do_sample=False)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out


class CTranslate2Backend:
    """ctranslate2.Translator over a converted folder, tokenized by the HF tokenizer beside it."""

    def __init__(self, settings: TranslateSettings):
        try:
            import ctranslate2
        except ImportError:
            raise TranslateError("translate.backend: ctranslate2 is not installed "
                                 "(pip install 'cnclip[translate]')") from None
        self.settings = settings
        self.tokenizer = _load_tokenizer(settings.model)
        device = settings.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        try:
            self.translator = ctranslate2.Translator(settings.model, device=device, compute_type="auto")
        except Exception as err:  # RuntimeError or ValueError from the C++ side, naming the missing file
            raise TranslateError(f"translate.model: {settings.model}: not a CTranslate2 model folder "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None

    @staticmethod
    def identity(settings: TranslateSettings) -> list:
        return ["ctranslate2", folder_identity(settings.model), settings.max_new_tokens]

    def translate(self, texts: list[str]) -> list[Optional[str]]:
        tokens = [self.tokenizer.convert_ids_to_tokens(self.tokenizer.encode(text)) for text in texts]
        results = self.translator.translate_batch(tokens, max_batch_size=self.settings.batch_size, beam_size=1,
                                                  max_decoding_length=self.settings.max_new_tokens)
        return [self.tokenizer.decode(self.tokenizer.convert_tokens_to_ids(result.hypotheses[0]),
                                      skip_special_tokens=True) for result in results]


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "nothing on stderr"


class CommandBackend:
    """The user's program, once per batch of `batch_size` texts, JSONL both ways."""

    def __init__(self, settings: TranslateSettings):
        self.settings = settings
        self.argv = list(settings.command)
        self.shown = shlex.join(self.argv)

    @staticmethod
    def identity(settings: TranslateSettings) -> list:
        """The command line as written: the program's own files are not read (an argument may name
        a log or counter the program appends to), so after changing what the program does, change
        its command line (a version argument) or remove the cache to translate again."""
        return ["command", list(settings.command)]

    def translate(self, texts: list[str]) -> list[Optional[str]]:
        out: list[Optional[str]] = []
        size = self.settings.batch_size
        for start in range(0, len(texts), size):
            out += self._batch(texts[start:start + size])
        return out

    def _batch(self, texts: list[str]) -> list[Optional[str]]:
        payload = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
        try:
            done = subprocess.run(self.argv, input=payload.encode("utf-8"), capture_output=True, check=False)
        except OSError as err:
            raise TranslateError(f"translate.command {self.shown}: cannot start it ({err.strerror})") from None
        if done.returncode != 0:
            raise TranslateError(f"translate.command {self.shown}: exited with status {done.returncode} "
                                 f"({_last_line(done.stderr)})")
        found: dict[str, str] = {}
        for number, line in enumerate(done.stdout.decode("utf-8", "replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, text = str(record["id"]), record["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError) as err:
                raise TranslateError(f"translate.command {self.shown}: output line {number} is not JSON "
                                     f"{{\"id\", \"text\"}} ({type(err).__name__}: {line[:80]!r}; "
                                     f"{_last_line(done.stderr)})") from None
            found[key] = text
        return [found.get(str(i)) for i in range(len(texts))]


BACKENDS: dict[str, Callable[[TranslateSettings], object]] = {
    "hf": HfBackend,
    "ctranslate2": CTranslate2Backend,
    "command": CommandBackend,
}


@contextlib.contextmanager
def libraries_quiet(log: Optional[Path | str]) -> Iterator[None]:
    """While a backend loads and runs: transformers' and Python's warnings into `log` (None: where
    they would go anyway) and its weight-loading progress bars off, so the stage's own progress bar
    and lines stay readable."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover (transformers is a dependency)
        hf_logging = None
    logged = library_log(log) if log is not None else contextlib.nullcontext()
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with logged:
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def backend_identity(settings: TranslateSettings) -> str:
    """The model part of the cache key: what translates (model files or program) and how."""
    return fingerprint(*BACKENDS[settings.backend].identity(settings))


def load_backend(settings: TranslateSettings):
    """The backend the settings name, loaded (model backends read their folder here)."""
    return BACKENDS[settings.backend](settings)
