"""The image processor's pixels for a training batch, bit for bit, at two thirds of its cost.

Drawing a batch competes with the training step for the machine's two cores: with every batch
drawn before the clock starts, run 50's command stepped 1.2-1.3 times as fast (training/README.md,
"Drawing cheaper, bit for bit"). Nearly half of the drawing was Idefics3's image processor (98 ms
of CPU a batch of 32, on an Intel Xeon), and less than half of that is its Lanczos resize: the
rest is the numpy around it (each image goes PIL -> numpy -> PIL for the resize -> numpy, then
is rescaled in float64, cast, and normalised, channel by channel). This does it in 65 ms.

For the training's inputs (one square, no splitting, no resize to a longest edge, 8-bit RGB)
every output value is a function of one 8-bit input value and its channel, so `SquarePixels`
resizes with the same Pillow call and maps the bytes through a 256-entry table made by the
processor's own `rescale` and `normalize`: the same float32 values, made once. Anything else it
is asked (another option, a non-RGB image, a numpy array) goes to the processor itself.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_base import BatchFeature

# the processor options this stand-in reproduces, as `build` sets them for training
_SETTINGS = {
    "do_convert_rgb": True,
    "do_resize": False,
    "do_image_splitting": False,
    "do_rescale": True,
    "do_normalize": True,
    "do_pad": True,
}
# the keyword arguments Idefics3Processor passes its image processor that change nothing here
_HARMLESS = {"return_tensors", "return_row_col_info"}


class SquarePixels:
    """Stands in for an Idefics3 image processor set up as `_SETTINGS` says; every attribute but
    the call is the processor's own."""

    def __init__(self, inner: Any) -> None:
        wrong = {k: got for k, v in _SETTINGS.items() if (got := getattr(inner, k, None)) != v}
        if wrong:
            raise ValueError(f"SquarePixels reproduces only {_SETTINGS}, not {wrong}")
        self.inner = inner
        self.side = int(inner.max_image_size["longest_edge"])
        # every byte value in every channel, through the processor's own arithmetic
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
        table = inner.normalize(
            inner.rescale(values, inner.rescale_factor), inner.image_mean, inner.image_std
        )
        self.table = np.ascontiguousarray(table[:, 0, :])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _ours(self, images: Any, kwargs: dict[str, Any]) -> bool:
        if set(kwargs) - _HARMLESS:
            return False
        if not isinstance(images, list) or not images:
            return False
        return all(
            isinstance(row, list)
            and row
            and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in row)
            for row in images
        )

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        if not self._ours(images, kwargs):
            theirs: BatchFeature = self.inner(images, **kwargs)
            return theirs
        most = max(len(row) for row in images)
        side = self.side
        pixels = np.zeros((len(images), most, 3, side, side), dtype=np.float32)
        mask = np.zeros((len(images), most, side, side), dtype=np.int64)
        for i, row in enumerate(images):
            for j, image in enumerate(row):
                # the processor's own call: Pillow's resize of the RGB image to the square
                drawn = np.asarray(image.resize((side, side), resample=self.inner.resample))
                for c in range(3):
                    np.take(self.table[c], drawn[:, :, c], out=pixels[i, j, c])
                mask[i, j] = 1
        # as the processor builds it: the lists of splits added after the conversion
        encoding = BatchFeature(
            data={"pixel_values": pixels, "pixel_attention_mask": mask},
            tensor_type=kwargs.get("return_tensors"),
        )
        if kwargs.get("return_row_col_info"):
            encoding["rows"] = [[0] * len(row) for row in images]
            encoding["cols"] = [[0] * len(row) for row in images]
        return encoding


def square_inputs(processor: Any) -> Any:
    """A copy of an Idefics3 `processor` whose image processor is `SquarePixels` (the tokenizer
    and everything else shared): what the training's batches are made with. A processor set up
    otherwise (or none, as some tests pass) comes back as it is."""
    inner = getattr(processor, "image_processor", None)
    if inner is None:
        return processor
    try:
        cheaper = SquarePixels(inner)
    except ValueError:
        return processor
    fast = copy.copy(processor)
    fast.image_processor = cheaper
    return fast
