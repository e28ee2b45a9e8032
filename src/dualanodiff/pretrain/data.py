"""The rendered pretraining images: the training corpus and the two held-out ones, and the words the
tokenizer keeps whole."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch

from dualanodiff.images import as_batch
from dualanodiff.model.base import IDENTIFIER_WORDS, VOCAB_WORDS, Architecture
from dualanodiff.synthetic import PRETRAIN_FAMILIES, world_item, world_words


@dataclass
class Corpus:
    """Rendered images (N x 3 x H x W uint8), their captions and kinds (see `synthetic.WORLD_KINDS`)."""

    images: torch.Tensor
    captions: list[str]
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _render_one(job: tuple) -> tuple[np.ndarray, str, str]:
    item = world_item(*job)
    return item.image, item.caption, item.kind


def render_corpus(
    seed: int, stream: int, count: int, resolution: int, families: tuple[str, ...] = PRETRAIN_FAMILIES,
    workers: int = 1,
) -> Corpus:
    """`count` world images of `stream` (0: training, 1: held out, 2: the held-out category), in parallel
    over `workers` processes; every image is fixed by its coordinates, so the result is the same for any
    number of workers."""
    jobs = [(seed, stream, i, resolution, tuple(families)) for i in range(count)]
    if workers > 1 and count > 64:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            items = pool.map(_render_one, jobs, chunksize=max(1, count // (workers * 8)))
    else:
        items = [_render_one(job) for job in jobs]
    images = as_batch([image for image, _, _ in items])
    return Corpus(images, [caption for _, caption, _ in items], [kind for _, _, kind in items])


def tokenizer_words(arch: Architecture, families: tuple[str, ...]) -> tuple[str, ...]:
    """The words the tokenizer keeps whole: a fixed list (v1), or the pretraining captions' words and the
    paper's identifiers, category names left to be spelled in characters (v2)."""
    if arch.vocabulary == "fixed":
        return VOCAB_WORDS
    return tuple(world_words(families)) + IDENTIFIER_WORDS


@dataclass
class Data:
    train: Corpus
    heldout: Corpus  # same families, other images
    unseen: Corpus  # the held-out category
