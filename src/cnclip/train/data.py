"""Streaming WebDataset input: shards -> (images, token ids) batches, never a shard set in memory.

Each process (rank) runs `workers` DataLoader workers; rank r's worker w reads the shards of slot
`r * workers + w`. Each slot's sample stream is infinite and deterministic:
  shards: each epoch a seeded permutation of all shards, the slot taking every (world×workers)-th
          (`resampled`: shards drawn with replacement from a per-slot seeded RNG, as for multi-node)
  -> samples (tar members grouped by key; unreadable tars are counted and skipped)
  -> seeded shuffle buffer -> skip the samples already consumed (resume) -> decode + open_clip's
  transform, seeded per sample -> batches (undecodable samples are counted and skipped).
Every batch reports its slot and stream position, so the training loop records the exact data
position of every worker and a resumed run replays precisely the batches it would have seen.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from cnclip._common.console import warn
from cnclip._common.mainguard import default_start_method, require_main_guard
from cnclip.train.config import DataSettings

# Where the shards are and how many samples they hold live in shards.py; the loader's users import
# these names from here too.
from cnclip.train.shards import (  # noqa: F401
    DataError,
    ShardSet,
    count_samples,
    expand_patterns,
    resolve_train_shards,
    scan_samples,
    tarfile_samples,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def unwrap_worker_error(err: DataError) -> DataError:
    """A DataLoader worker's DataError reaches the main process as a DataError whose message is
    the worker's whole traceback; keep only the original one-line message."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    text = str(err)
    return DataError(text.rsplit(marker, 1)[1].strip()) if marker in text else err


def _warn_and_continue(exn: Exception) -> bool:
    warn(f"skipping unreadable shard data: {str(exn)[:200]}")
    return True


def read_captions(shards: Sequence[str]) -> Iterator[str]:
    """Every caption in the shards (reads the tars; used to build a corpus vocab)."""
    for sample in tarfile_samples([{"url": s} for s in shards], handler=_warn_and_continue):
        if "txt" in sample:
            yield from sample["txt"].decode("utf-8", errors="replace").splitlines()


# --- the training stream ---------------------------------------------------------------------------

def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


ERRORS_PER_WORKER = 20  # error messages each worker reports (the first ones); every error is counted


@dataclass
class StreamCounters:
    """What a worker met since its last batch: counts, and messages while under the cap."""

    bad_shards: int = 0
    bad_samples: int = 0
    errors: list[str] = field(default_factory=list)
    reported: int = 0  # messages reported so far by this worker

    def note(self, message: str) -> None:
        if self.reported < ERRORS_PER_WORKER:
            self.errors.append(message[:200])
            self.reported += 1

    def take(self) -> dict:
        """The batch's share (what happened since the previous batch); resets the counts."""
        out = {"bad_samples": self.bad_samples, "bad_shards": self.bad_shards, "errors": self.errors}
        self.bad_samples, self.bad_shards, self.errors = 0, 0, []
        return out


def _shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    # A plain reservoir: fill, then emit a random element per new one. Seeded, so replayable.
    if bufsize <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
            return image.convert("RGB")
    raise ValueError("no image member")


class ShardStream(IterableDataset):
    """Infinite batches for one rank; see the module docstring."""

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        transform: Callable,
        tokenizer: Callable,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        positions: Optional[dict[int, int]] = None,
        first_slot_role: int = 0,
    ):
        slots = world_size * max(workers, 1)
        if not resampled and len(shards) < slots:
            raise DataError(f"data.train: {len(shards)} shards for {world_size} processes × {max(workers, 1)} "
                            f"workers: need at least {slots} (or set data.resampled: true)")
        self.shards, self.batch_size, self.transform, self.tokenizer = shards, batch_size, transform, tokenizer
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, max(workers, 1)
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.positions = dict(positions or {})
        self.first_slot_role = first_slot_role

    def _shard_urls(self, slot: int, progress: Callable[[], int]) -> Iterator[dict]:
        """Shard URLs for one slot, forever; a DataError when a whole pass over its shards (or, in
        resampled mode, as many draws as there are shards, ten times over) yields no sample, so
        unreadable shards stop training with a message instead of hanging it."""
        slots = self.world_size * self.workers
        if self.resampled:
            rng = random.Random(_seed(self.seed, "resampled", slot))
            patience = 10 * len(self.shards)
            while True:
                before = progress()
                for _ in range(patience):
                    yield {"url": rng.choice(self.shards)}
                if progress() == before:
                    raise DataError(f"data: {patience} shard draws gave worker slot {slot} no sample; "
                                    f"are the shards readable? (first: {self.shards[0]})")
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(_seed(self.seed, "epoch", epoch)).shuffle(order)
            before = progress()
            mine = order[slot::slots]
            for url in mine:
                yield {"url": url}
            if progress() == before:
                raise DataError(f"data: none of worker slot {slot}'s shards gave a sample: {', '.join(mine[:3])}")
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker_id = info.id if info is not None else 0
        # After a resume, worker 0 must produce the batch the interrupted run would have read next.
        role = (worker_id + self.first_slot_role) % self.workers
        slot = self.rank * self.workers + role
        counters = StreamCounters()
        position = 0
        skip = self.positions.get(role, 0)

        def on_error(exn: Exception) -> bool:
            # While replaying (reading towards sample `skip`), errors were already counted and logged
            # before the checkpoint: the batch that ended at `skip` reported them.
            if position >= skip:
                counters.bad_shards += 1
                counters.note(str(exn))
            return True

        read = 0  # samples read from the tars (replayed ones too), for the no-progress check

        def counted(stream: Iterator[dict]) -> Iterator[dict]:
            nonlocal read
            for sample in stream:
                read += 1
                yield sample

        samples = counted(tarfile_samples(self._shard_urls(slot, lambda: read), handler=on_error))
        samples = _shuffled(samples, self.shuffle_buffer, random.Random(_seed(self.seed, "shuffle", slot)))
        images, captions, keys = [], [], []
        for sample in samples:
            position += 1
            if position <= skip:
                continue  # already trained on before the interruption: not even decoded
            try:
                caption = sample["txt"].decode("utf-8").strip()
                image = decode_image(sample)
                # Augmentation seeded by the sample's stream position: identical on replay,
                # whatever worker or process runs it.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed(self.seed, "augment", slot, position))
                    pixels = self.transform(image)
            except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped and counted
                counters.bad_samples += 1
                counters.note(f"{sample.get('__key__')}: {exn}")
                continue
            images.append(pixels)
            captions.append(caption)
            keys.append(f"{sample.get('__url__')}:{sample['__key__']}")
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "text": self.tokenizer(captions),
                    "keys": keys,
                    "shards": sorted({k.rsplit(":", 1)[0] for k in keys}),
                    "role": role,
                    "position": position,
                    **counters.take(),
                }
                images, captions, keys = [], [], []


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class DataPosition:
    """Where a rank's stream is: per worker role, samples read; and the role that reads next."""

    positions: dict[int, int] = field(default_factory=dict)
    next_role: int = 0
    workers: int = 1
    batches: int = 0
    bad_samples: int = 0
    bad_shards: int = 0
    shards: set = field(default_factory=set)  # read by this rank (not checkpointed; for the log)

    def advance(self, batch: dict) -> None:
        self.shards.update(batch["shards"])
        self.positions[batch["role"]] = batch["position"]
        self.next_role = (batch["role"] + 1) % self.workers
        self.batches += 1
        self.bad_samples += batch["bad_samples"]
        self.bad_shards += batch["bad_shards"]

    def state_dict(self) -> dict:
        return {"positions": {int(k): int(v) for k, v in self.positions.items()}, "next_role": self.next_role,
                "workers": self.workers, "batches": self.batches, "bad_samples": self.bad_samples,
                "bad_shards": self.bad_shards}

    @classmethod
    def from_state(cls, state: dict) -> "DataPosition":
        return cls({int(k): int(v) for k, v in state["positions"].items()}, state["next_role"], state["workers"],
                   state["batches"], state["bad_samples"], state["bad_shards"])


def train_loader(
    shards: list[str],
    data: DataSettings,
    *,
    batch_size: int,
    transform: Callable,
    tokenizer: Callable,
    seed: int,
    rank: int,
    world_size: int,
    position: Optional[DataPosition] = None,
) -> DataLoader:
    """A DataLoader over this rank's infinite stream, resuming at `position` if given."""
    if data.workers:
        require_main_guard("data.workers (DataLoader workers)", default_start_method())
    workers = max(data.workers, 1)
    if position is not None and position.workers != workers:
        raise DataError(f"data.workers: the checkpoint was written with {position.workers} workers; exact "
                        f"resume needs the same number (or data.exact_resume: false)")
    stream = ShardStream(
        shards, batch_size=batch_size, transform=transform, tokenizer=tokenizer, seed=seed, rank=rank,
        world_size=world_size, workers=data.workers, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled,
        positions=position.positions if position else None, first_slot_role=position.next_role if position else 0,
    )
    return DataLoader(
        stream, batch_size=None, num_workers=data.workers, worker_init_fn=_worker_init,
        prefetch_factor=2 if data.workers else None, persistent_workers=data.workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


# --- evaluation sets -------------------------------------------------------------------------------

@dataclass
class EvalBatch:
    images: torch.Tensor
    captions: list[list[str]]  # several captions per image: one per line of {key}.txt
    groups: list[str]  # samples of the same image (same sha256 in {key}.json) are one image
    labels: list[Optional[int]]  # {key}.cls, for zero-shot classification


def eval_batches(patterns: Sequence[str], transform: Callable, batch_size: int,
                 max_samples: Optional[int] = None, origin: str = "eval") -> Iterator[EvalBatch]:
    """The eval shards in order, decoded with the validation transform; bad samples are skipped."""
    shards = expand_patterns(patterns, origin)
    images, captions, groups, labels, seen = [], [], [], [], 0
    for sample in tarfile_samples([{"url": s} for s in shards], handler=_warn_and_continue):
        if max_samples is not None and seen >= max_samples:
            break
        try:
            image = transform(decode_image(sample))
            lines = [ln.strip() for ln in sample.get("txt", b"").decode("utf-8").splitlines() if ln.strip()]
            meta = json.loads(sample["json"]) if "json" in sample else {}
            label = int(sample["cls"].decode().strip()) if "cls" in sample else None
        except Exception:  # noqa: BLE001 - an undecodable eval sample is skipped, like in training
            continue
        seen += 1
        images.append(image)
        captions.append(lines)
        groups.append(meta.get("sha256") or f"{sample['__url__']}:{sample['__key__']}")
        labels.append(label)
        if len(images) == batch_size:
            yield EvalBatch(torch.stack(images), captions, groups, labels)
            images, captions, groups, labels = [], [], [], []
    if images:
        yield EvalBatch(torch.stack(images), captions, groups, labels)
