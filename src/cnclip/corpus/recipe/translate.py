"""Recipe section `translate`: machine translation of the captions of English sources into Chinese,
before the text stage (whose Chinese-ratio filter then reads the translation).

The backend is the user's: a local seq2seq model folder through transformers (`hf`), a model
folder converted for CTranslate2 (`ctranslate2`), or any program speaking JSONL on stdin/stdout
(`command`). Results are cached by (backend, model, caption), so a rerun translates nothing again.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from cnclip._common.strict import StrictModel


class TranslateSettings(StrictModel):
    """Which sources' captions are English, and the backend that translates them."""

    sources: list[str] = Field(min_length=1, description="names of the sources whose captions are English")
    backend: Literal["hf", "ctranslate2", "command"] = "hf"
    model: Optional[str] = Field(default=None, description="hf, ctranslate2: a local model folder")
    command: Optional[list[str]] = Field(
        default=None, min_length=1,
        description="command: the program and its arguments; JSONL {id, text} on stdin -> JSONL {id, text} on stdout")
    batch_size: int = Field(default=32, ge=1, le=65_536)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    cache: Optional[str] = Field(default=None, description="folder of the translation cache "
                                                           "(default: <output_dir>/work/translate-cache)")

    @model_validator(mode="after")
    def _backend_inputs(self) -> "TranslateSettings":
        """A model backend needs its folder, the command backend its program, and neither the other's."""
        if self.backend == "command":
            if self.command is None:
                raise ValueError("backend command needs `command` (the program and its arguments)")
            if self.model is not None:
                raise ValueError("model is a setting of backends hf and ctranslate2 (backend is command)")
        else:
            if self.model is None:
                raise ValueError(f"backend {self.backend} needs `model` (a local model folder)")
            if self.command is not None:
                raise ValueError(f"command is a setting of backend command (backend is {self.backend})")
        repeated = sorted({name for name in self.sources if self.sources.count(name) > 1})
        if repeated:
            raise ValueError(f"sources named twice: {', '.join(repeated)}")
        return self


def translate_problems(settings: Optional[TranslateSettings], source_names: list[str]) -> list[str]:
    """`translate.sources` entries that name no source of the recipe, one line each."""
    if settings is None:
        return []
    return [f"translate.sources[{index}]: no source named {name!r} (sources: {', '.join(source_names)})"
            for index, name in enumerate(settings.sources) if name not in source_names]
