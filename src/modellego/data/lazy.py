"""Images decoded when they are used: photo folders too large to hold in memory.

A :class:`LazyImages` is a list of image files and the :class:`Recipe` that turns each into
a ``(C, H, W)`` uint8 array (mode, size, and whether to resize-and-centre-crop). It behaves
like the ``(N, C, H, W)`` float tensor in [0, 1] it stands for wherever a split's images are
subset (indexing by positions, masks or slices gives another lazy list, decoding nothing),
and decodes only when asked: :meth:`LazyImages.decode` for a bounded number of images, or
:meth:`LazyImages.batches`, which streams batches through a
:class:`torch.utils.data.DataLoader` with worker processes (:func:`reading` sets how many).

:func:`~modellego.data.model_input` of lazy images is a :class:`ModelInputs`: indexing it
decodes those images and converts them as the network reads them, so code written for a
tensor of model inputs (``x[idx]``, ``x[a:b]``, ``len(x)``, ``x.shape``) runs on a folder of
any size while holding one batch at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from modellego.errors import DataError
from modellego.terminal import progress_enabled

#: how much of the image the centre crop keeps along its shorter side (the usual 224/256)
CROP_RATIO = 0.875
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: how many bytes :meth:`LazyImages.decode` may produce at once unless :func:`reading` says
DEFAULT_MAX_MEMORY = 4 << 30

_WORKERS: contextvars.ContextVar[int] = contextvars.ContextVar("modellego_workers", default=0)
_MAX_MEMORY: contextvars.ContextVar[int] = contextvars.ContextVar(
    "modellego_max_memory", default=DEFAULT_MAX_MEMORY)


@contextlib.contextmanager
def reading(*, workers: int | None = None, max_memory: int | None = None) -> Iterator[None]:
    """Within the block, lazy images decode with ``workers`` DataLoader worker processes (0:
    in this process), and a step holds at most about ``max_memory`` bytes at once: no more
    images are decoded at once, and profiles of many classes are made in chunks of classes
    whose statistics fit (see :func:`max_memory`)."""
    tokens = []
    if workers is not None:
        if workers < 0:
            raise DataError(f"`workers` must be >= 0, got {workers}")
        tokens.append((_WORKERS, _WORKERS.set(int(workers))))
    if max_memory is not None:
        if max_memory < 1:
            raise DataError(f"the memory bound must be positive, got {max_memory} bytes")
        tokens.append((_MAX_MEMORY, _MAX_MEMORY.set(int(max_memory))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def spans(n: int, size: int) -> list[range]:
    """``range(0, size), range(size, 2 * size), ...``: batches of positions covering
    ``range(n)``."""
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def workers() -> int:
    """The number of decoding worker processes :func:`reading` set (default 0)."""
    return _WORKERS.get()


def max_memory() -> int:
    """The bound in bytes :func:`reading` set (default :data:`DEFAULT_MAX_MEMORY`)."""
    return _MAX_MEMORY.get()


def parse_memory(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"2.5GiB"`` or a number of bytes -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" and t else t
    try:
        value = float(number) * scale
    except ValueError:
        raise DataError(f"memory size {text!r}: write a number with K, M or G (e.g. 4G)") from None
    if not value >= 1 or value != value:
        raise DataError(f"memory size {text!r} must be positive")
    return int(value)


@dataclass(frozen=True)
class Recipe:
    """How one file becomes an array: ``mode`` "L" or "RGB", ``size`` (H, W), and ``crop``:
    resize (bilinear) so that the image covers ``size / CROP_RATIO`` and cut the centre
    ``size`` out (the usual evaluation transform); without it an image of another size is
    resized to ``size`` whole."""

    mode: str
    size: tuple[int, int]
    crop: bool

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": list(self.size), "crop": self.crop}


def open_image(path: str) -> tuple[Image.Image, bool]:
    """Load one image; return it converted to L or RGB and whether it is greyscale."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit greyscale: keep the high byte
                arr16 = np.asarray(im).astype(np.uint16)
                return Image.fromarray((arr16 >> 8).astype(np.uint8)), True
            if im.mode in _GREY_MODES:
                return im.convert("L"), True
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image {path} ({exc}); replace or delete the file"
        ) from exc
    if im.mode == "P":  # palette images with a grey palette count as greyscale
        arr = np.asarray(rgb)
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return rgb.convert("L"), True
    return rgb, False


def shape_image(im: Image.Image, recipe: Recipe) -> np.ndarray:
    """``im`` in ``recipe``'s mode and size, as a ``(C, H, W)`` uint8 array."""
    if im.mode != recipe.mode:
        im = im.convert(recipe.mode)
    h, w = recipe.size
    if recipe.crop:
        scale = max(h / im.height, w / im.width) / CROP_RATIO
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        if (rw, rh) != im.size:
            im = im.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - w) // 2, (rh - h) // 2
        im = im.crop((left, top, left + w, top + h))
    elif im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_file(path: str, recipe: Recipe) -> np.ndarray:
    return shape_image(open_image(path)[0], recipe)


class _Files(torch.utils.data.Dataset):
    """The files as a map-style dataset for the DataLoader. A file that cannot be read
    gives its one-line message instead of an array (a worker's exception would reach the
    caller with its traceback folded into the message)."""

    def __init__(self, paths: Sequence[str], recipe: Recipe) -> None:
        self.paths, self.recipe = paths, recipe

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray | str:
        try:
            return decode_file(self.paths[i], self.recipe)
        except DataError as exc:
            return str(exc)


def _collate(items: list) -> torch.Tensor | str:
    for item in items:
        if isinstance(item, str):
            return item
    return torch.from_numpy(np.stack(items))


def _checked(batch: torch.Tensor | str) -> torch.Tensor:
    if isinstance(batch, str):
        raise DataError(batch)
    return batch


Key = Union[int, slice, torch.Tensor, Sequence[int], np.ndarray]


class LazyImages:
    """``paths`` decoded by ``recipe``: stands for a float32 ``(N, C, H, W)`` tensor in [0, 1]
    (see the module docstring)."""

    dtype = torch.float32

    def __init__(self, paths: Sequence[str], recipe: Recipe) -> None:
        self.paths = tuple(str(p) for p in paths)
        self.recipe = recipe

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.recipe.channels, *self.recipe.size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} files, {self.recipe})"

    def positions(self, key: Key) -> list[int]:
        """The positions ``key`` selects (a slice, a bool mask, or positions)."""
        n = len(self.paths)
        if isinstance(key, slice):
            return list(range(n))[key]
        if isinstance(key, int):
            raise TypeError("index lazy images with positions, a mask or a slice")
        idx = torch.as_tensor(np.asarray(key) if not isinstance(key, torch.Tensor) else key)
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise IndexError(f"mask of shape {tuple(idx.shape)} for {n} images")
            idx = idx.nonzero().flatten()
        out = [int(i) for i in idx.reshape(-1)]
        if any(not -n <= i < n for i in out):
            raise IndexError(f"image position out of range for {n} images")
        return [i % n for i in out]

    def __getitem__(self, key: Key) -> LazyImages:
        return LazyImages([self.paths[i] for i in self.positions(key)], self.recipe)

    def nbytes(self, count: int | None = None) -> int:
        """Bytes of ``count`` images (default: all) as float32."""
        c, h, w = self.shape[1:]
        return (len(self) if count is None else count) * c * h * w * 4

    def uint8_batches(self, batches: Iterable[Sequence[int]]) -> Iterator[torch.Tensor]:
        """The uint8 images of each batch of positions, decoded by :func:`workers` worker
        processes (in order; a batch is ready while the next ones are decoded)."""
        lists = [[int(i) for i in b] for b in batches]
        n_workers = min(workers(), len(lists)) if len(lists) > 1 else 0
        if n_workers == 0:
            for b in lists:
                yield torch.from_numpy(np.stack([decode_file(self.paths[i], self.recipe)
                                                 for i in b]))
            return
        loader = torch.utils.data.DataLoader(
            _Files(self.paths, self.recipe), batch_sampler=lists, num_workers=n_workers,
            collate_fn=_collate)
        for batch in loader:
            yield _checked(batch)

    def batches(self, batches: Iterable[Sequence[int]]) -> Iterator[torch.Tensor]:
        """The float32 [0, 1] images of each batch of positions (see :meth:`uint8_batches`)."""
        for b in self.uint8_batches(batches):
            yield b.to(torch.float32).div_(255.0)

    def decode(self, what: str = "these images") -> torch.Tensor:
        """All the images as one float32 tensor; refused above the memory bound."""
        need, limit = self.nbytes(), _MAX_MEMORY.get()
        if need > limit:
            raise DataError(
                f"{what} would decode {len(self)} images of shape {list(self.shape[1:])} "
                f"({need / 2**30:.1f} GiB) at once, over the bound of {limit / 2**30:.1f} "
                "GiB; use fewer images or raise the bound (`max_memory`)")
        if not len(self):
            return torch.zeros(tuple(self.shape), dtype=torch.float32)
        return torch.cat(list(self.batches(spans(len(self), 256))))

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Decoded float32 images at ``index`` (``dim`` 0 only), as a tensor would give."""
        if dim != 0:
            raise IndexError("lazy images select along the image dimension only")
        return self[index].decode()


class ModelInputs:
    """Lazy images as a network reads them (made by :func:`~modellego.data.model_input`):
    indexing decodes them and applies ``convert`` (a function of a float [0, 1] batch giving
    inputs of shape ``shape``)."""

    dtype = torch.float32

    def __init__(self, images: LazyImages, shape: Sequence[int],
                 convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.convert = images, convert
        self._shape = torch.Size((len(images), *(int(v) for v in shape)))

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"ModelInputs({len(self)} images of shape {list(self.shape[1:])})"

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.convert(self.images[key].decode())

    def subset(self, key: Key) -> ModelInputs:
        """The inputs at ``key``, still lazy."""
        return ModelInputs(self.images[key], self._shape[1:], self.convert)

    def batches(self, batches: Iterable[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Converted inputs per batch of positions, streamed (see
        :meth:`LazyImages.uint8_batches`)."""
        for b in self.images.batches(batches):
            yield self.convert(b)

    def decode(self, what: str = "these images") -> torch.Tensor:
        return self.convert(self.images.decode(what))


#: what code that runs a network over images accepts: a tensor, or lazy model inputs
Inputs = Union[torch.Tensor, ModelInputs]


def iter_batches(x: Inputs, batches: Iterable[Sequence[int]] | Iterable[torch.Tensor]
                 ) -> Iterator[torch.Tensor]:
    """``x[b]`` for each batch ``b`` of positions: indexing for a tensor, streamed through
    the DataLoader for lazy inputs."""
    if isinstance(x, ModelInputs):
        yield from x.batches([[int(i) for i in b] for b in batches])
        return
    for b in batches:
        if isinstance(b, range) and b.step == 1:
            yield x[b.start:b.stop]
        else:
            yield x[b if isinstance(b, torch.Tensor)
                    else torch.as_tensor(list(b), dtype=torch.long)]


def iter_slices(x: Inputs, batch_size: int) -> Iterator[torch.Tensor]:
    """``x[a:a + batch_size]`` for ``a = 0, batch_size, ...`` (streamed for lazy inputs)."""
    return iter_batches(x, spans(len(x), batch_size))


#: the input values a default batch of a pass over images holds (an eighth of a million
#: 28 x 28 images would be 500 of them; 55 images at 3 x 224 x 224)
BATCH_VALUES = 1 << 23


#: the bytes of a network's largest activation a batch may hold, when the network is known
#: (a channel graph's shapes): a batch whose activations stay in a core's caches runs
#: faster on a CPU (MobileNet-V2 at 28 px, one thread: 1,000 images in 1.4 s in batches of
#: 32, 4.7 s in batches of 500; a ResNet-50 at 224 px: 6.9 s for 110 images in batches of 8,
#: 10.6 s in batches of 55)
ACTIVATION_BYTES = 8 << 20
#: the smallest batch :func:`default_batch` picks for a known network (below it, per-call
#: overhead dominates)
MIN_BATCH = 8


def default_batch(shape: Sequence[int], most: int = 500, *,
                  sample_bytes: int | None = None) -> int:
    """A batch size for a pass over images of ``shape`` (C, H, W): ``most`` for small
    images, fewer for large ones, so that a batch's activations stay bounded.

    ``sample_bytes``: the network's largest activation for one image (see
    :meth:`~modellego.surgery.graph.ChannelGraph.sample_bytes`), when known: then also
    at most :data:`ACTIVATION_BYTES` of it per batch, and at least :data:`MIN_BATCH` images
    (or the bound above, where smaller)."""
    size = 1
    for v in shape:
        size *= int(v)
    batch = max(1, min(most, BATCH_VALUES // max(1, size)))
    if sample_bytes:
        batch = min(batch, max(MIN_BATCH, ACTIVATION_BYTES // int(sample_bytes)))
    return batch


def streamed(x: Any) -> bool:
    """Whether ``x`` is lazy inputs and :func:`~modellego.terminal.showing_progress` is on:
    a pass over it is long enough to show progress."""
    return isinstance(x, (LazyImages, ModelInputs)) and progress_enabled()


def take(x: Inputs, index: torch.Tensor) -> Inputs:
    """``x[index]``, kept lazy for lazy inputs (decoded when used)."""
    return x.subset(index) if isinstance(x, ModelInputs) else x[index]


def as_tensor(x: Any, what: str = "these images") -> torch.Tensor:
    """``x`` itself when it is a tensor, else lazy images decoded whole (bounded)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (LazyImages, ModelInputs)):
        return x.decode(what)
    raise TypeError(f"expected images, got {type(x).__name__}")


def default_workers() -> int:
    """The command line's default ``--workers``: half the cores, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))
