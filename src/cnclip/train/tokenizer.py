"""BERT WordPiece tokenization with Chinese-CLIP's conventions.

Chinese-CLIP (`cn_clip.clip.tokenize`) lowercases, strips accents, splits every CJK character into
its own word, runs WordPiece (words over 200 characters become [UNK]) and writes
`[CLS] tokens[:context-2] [SEP]` padded with [PAD]=0 to 52 ids. This module does the same with the
Rust `tokenizers` WordPiece (HF's Python BertTokenizer caps words at 100 characters, which differs).

With `normalize=True` (every tokenizer a model is trained, evaluated or searched with: factory.py)
each text first goes through the corpus's caption normalization (corpus/ops/normalize.py: NFKC,
invisible characters, OpenCC t2s, ...), so a query, an eval caption and a training caption reach
the model alike: `２０２３年ＮＢＡ總決賽` gives the ids of `2023年NBA总决赛`, not [UNK]s. Without it
the ids are cn_clip.clip.tokenize's of the raw text.

The tokenizer object is callable like open_clip's tokenizers (`tok(texts) -> LongTensor`), so
open_clip's zero-shot classifier builder takes it as is; `save()` writes the files open_clip's
`HFTokenizer` loads from an exported `local-dir:` model, with a tokenizer.json whose normalizer does
what a tokenizers normalizer can of the same (NFKC, invisible characters, a character-level t2s map;
not OpenCC's phrase conversions nor HTML entities).

Vocabularies: `bert-base-chinese` (the 21,128-token vocab Chinese-CLIP and Chinese RoBERTa use,
shipped in cnclip/train/data/), the `vocab.txt` of the text tower's directory, any BERT vocab file,
or `build_corpus_vocab(captions)` for a text tower trained from scratch.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from cnclip._common.errors import CnclipError

BERT_BASE_CHINESE_VOCAB = Path(__file__).parent / "data" / "bert-base-chinese-vocab.txt"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# cn_clip's WordpieceTokenizer default; HF's BertTokenizer uses 100.
MAX_CHARS_PER_WORD = 200


class TokenizerError(CnclipError, ValueError):
    """A vocab file that cannot be read or lacks BERT's special tokens."""


def normalize_texts(texts: Sequence[str]) -> list[str]:
    from cnclip.corpus.ops import normalize

    return normalize.normalize_texts(list(texts))


def _normalizer() -> normalizers.Normalizer:
    # strip_accents=None follows lowercase, as BERT's BasicTokenizer(do_lower_case=True) does.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


class ChineseTokenizer:
    """Text -> `[n, context_length]` LongTensor of BERT ids, Chinese-CLIP style."""

    def __init__(self, vocab: Sequence[str], context_length: int = 52, normalize: bool = False):
        self.vocab = list(vocab)
        self.normalize = normalize
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise TokenizerError(f"vocab lacks the special tokens {', '.join(missing)}")
        ids = {token: i for i, token in enumerate(self.vocab)}
        self.context_length = context_length
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (ids[t] for t in SPECIAL_TOKENS[:4])
        self._tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=MAX_CHARS_PER_WORD))
        self._tok.normalizer = _normalizer()
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    @classmethod
    def from_file(cls, path: Union[str, Path], context_length: int = 52, normalize: bool = False) -> "ChineseTokenizer":
        vocab = read_vocab(path)
        try:
            return cls(vocab, context_length, normalize)
        except TokenizerError as err:
            raise TokenizerError(f"{path}: {err}") from None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def vocab_text(self) -> str:
        return "\n".join(self.vocab) + "\n"

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(self._texts([text])[0], add_special_tokens=False).tokens

    def _texts(self, texts: Sequence[str]) -> list[str]:
        return normalize_texts(texts) if self.normalize else list(texts)

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(self._tok.encode_batch(self._texts(texts), add_special_tokens=False)):
            ids = [self.cls_id, *encoding.ids[: length - 2], self.sep_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, directory: Union[str, Path]) -> None:
        """vocab.txt, tokenizer.json + tokenizer_config.json: what HF's AutoTokenizer (open_clip's
        HFTokenizer) reads; the fast tokenizer in tokenizer.json carries the query normalizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.txt").write_text(self.vocab_text, encoding="utf-8")
        if self.normalize:  # the fast tokenizer file, loaded as written, carries the normalizer
            self._export_tokenizer().save(str(directory / "tokenizer.json"))
        config = {
            # BertTokenizer rebuilds its own normalizer from these flags; the generic fast class
            # loads tokenizer.json as written.
            "tokenizer_class": "PreTrainedTokenizerFast" if self.normalize else "BertTokenizer",
            "do_lower_case": True,
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "model_max_length": self.context_length,
            "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def _export_tokenizer(self) -> Tokenizer:
        """This normalizing tokenizer for HF: normalize_texts() as far as a tokenizers normalizer
        can express it, then the same WordPiece, `[CLS] ... [SEP]` around the ids."""
        ids = {token: i for i, token in enumerate(self.vocab)}
        tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=MAX_CHARS_PER_WORD))
        tok.normalizer = normalizers.Sequence([
            normalizers.NFKC(),
            normalizers.Replace(Regex(_INVISIBLE), ""),
            *(normalizers.Replace(t, s) for t, s in _t2s_characters(ids)),
            _normalizer(),
        ])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.BertProcessing(("[SEP]", self.sep_id), ("[CLS]", self.cls_id))
        tok.decoder = decoders.WordPiece()
        return tok


# corpus/ops/normalize.py's invisible characters, in the regex dialect of tokenizers (Oniguruma).
_INVISIBLE = "[\\p{Cf}\u034f]"
# CJK Unified Ideographs, Extension A and the compatibility ideographs: where t2s maps characters.
_CJK_RANGES = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0xF900, 0xFB00))


def _t2s_characters(vocab: dict) -> list[tuple[str, str]]:
    """(traditional, simplified) per character OpenCC t2s maps to one other character that is in
    `vocab` (elsewhere the mapping changes no id worth having: both would be [UNK] or the
    traditional one is the only known)."""
    import polars as pl

    from cnclip.corpus.ops.normalize import convert_chinese

    chars = [chr(c) for lo, hi in _CJK_RANGES for c in range(lo, hi)]
    converted = convert_chinese(pl.Series(chars, dtype=pl.String)).to_list()
    return [(a, b) for a, b in zip(chars, converted, strict=True) if a != b and len(b) == 1 and b in vocab]


def read_vocab(path: Union[str, Path]) -> list[str]:
    # Like BERT's load_vocab: one token per line, trailing whitespace stripped, order is the id.
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read the vocab ({getattr(err, 'strerror', None) or err})") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip() for line in lines]


def build_corpus_vocab(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """A character-level BERT vocab covering `captions`: every character seen, plus `##c` for
    characters inside non-CJK words, so nothing in the corpus becomes [UNK]."""
    normalizer, pre = _normalizer(), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(caption)):
            counts[word[0]] += 1
            counts.update("##" + ch for ch in word[1:])
    tokens = sorted((t for t, n in counts.items() if n >= min_count and t not in SPECIAL_TOKENS),
                    key=lambda t: (-counts[t], t))
    return SPECIAL_TOKENS + tokens
