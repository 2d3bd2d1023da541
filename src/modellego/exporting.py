"""Export a model file's network for deployment: ONNX or a ``torch.export`` program (``.pt2``),
checked against modellego's own outputs before it is kept.

The exported network takes what the model file's input contract says, in a form a deployment
can feed without modellego: ``float32`` images in ``[0, 1]`` of the contract's shape
``(N, C, H, W)`` with any batch size ``N``; the normalisation by the contract's mean and std is
inside the network (assemblies read ``[0, 1]`` images and adapt them inside already). Its output
is the model's logits, one column per class of the manifest (an assembly's labels; a
one-vs-rest module's concern scores). The file carries as metadata the class ids and names,
the input contract and the SHA-256 of the modellego manifest it was made from
(:func:`export_metadata`): ONNX ``metadata_props``, a ``.pt2`` archive's extra file
``modellego.json``.

After writing, the export is **checked**: the written file is loaded by onnxruntime (or
``torch.export.load``) and run on the check images at two batch sizes; the largest absolute
difference from modellego's logits must be at most :data:`MAX_DIFF` times the largest absolute
logit (at least 1), or the file is removed and :class:`ExportError` says by how much it
differed (relative beyond 1: float32 kernels that sum in another order differ by about 1e-7 of
the values summed). The check images are test images of the
model's dataset (an assembly's: of its parts' datasets) when they can be read, else seeded
random ``[0, 1]`` images, and the report says which.

ONNX goes through ``torch.export`` and the dynamo-based exporter of ``torch.onnx``; a network
``torch.export`` cannot capture falls back to the TorchScript-based exporter, and the report
names the exporter used. A ``.pt2`` file needs ``torch.export``; it stores plain tensors as raw
bytes (no pickle). The dependencies (``onnx``, ``onnxruntime``, ``onnxscript``) are the extra
``modellego[export]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ._version import __version__
from .errors import DataError, ExportError, exception_line
from .manifest import Manifest

#: the formats :func:`export_model` writes
FORMATS = ("onnx", "pt2")
#: the largest absolute logit difference an export may have from modellego's outputs,
#: relative to the largest absolute logit when that is above 1 (see the module docstring)
MAX_DIFF = 1e-4
#: check images used by default, and the most a check reads (they are held in memory)
CHECK_IMAGES = 64
MAX_CHECK_IMAGES = 2048
#: channel counts are padded to multiples of this by default (see
#: :mod:`modellego.surgery.align`): onnxruntime's fast CPU convolutions need them
ALIGN = 8
#: the ONNX operator set written by the dynamo-based exporter
ONNX_OPSET = 20
_TORCHSCRIPT_OPSET = 17
_EXTRA = "modellego.json"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote and how it was checked."""

    path: str
    format: str
    exporter: str
    check_images: int
    check_source: str
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    manifest_sha256: str
    input_shape: tuple[int, int, int]
    seconds: float
    #: channel counts padded to multiples of ``align`` (1: not asked for) ...
    align: int = 1
    #: ... with this many channels that change nothing, in this many channel groups
    channels_added: int = 0
    spaces_padded: int = 0
    #: why nothing was padded, when nothing was
    align_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_sizes"] = list(self.batch_sizes)
        out["input_shape"] = list(self.input_shape)
        return out


class ContractInput(nn.Module):
    """``model`` behind its input contract: ``[0, 1]`` images in, normalised inside. (The
    buffers have names no network's own tensors or operators take: a graph value named
    ``mean`` made the dynamo exporter's unoptimised output invalid.)"""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.normalise = any(m != 0.0 for m in mean) or any(s != 1.0 for s in std)
        self.input_mean_of_contract: torch.Tensor
        self.input_std_of_contract: torch.Tensor
        self.register_buffer("input_mean_of_contract", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("input_std_of_contract", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.input_mean_of_contract) / self.input_std_of_contract
        return self.model(x)


def manifest_text(manifest: Manifest) -> str:
    """The manifest as a model file stores it (sorted-key JSON)."""
    return json.dumps(manifest.to_dict(), sort_keys=True)


def export_metadata(manifest: Manifest, text: str | None = None) -> dict[str, str]:
    """The metadata an export carries, every value a string (JSON where structured).

    ``text`` is the manifest as stored in the file exported (its SHA-256 is recorded);
    without it, the manifest as :func:`manifest_text` writes it."""
    text = manifest_text(manifest) if text is None else text
    contract = manifest.input
    meta = {
        "modellego.version": __version__,
        "modellego.kind": manifest.kind,
        "modellego.manifest_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "modellego.classes": json.dumps(list(manifest.classes)),
        "modellego.class_names": json.dumps(list(manifest.class_names)),
        "modellego.input": json.dumps({
            "shape": ["batch", *contract.shape], "dtype": "float32", "range": [0.0, 1.0],
            "normalisation": "inside", "mean": list(contract.mean), "std": list(contract.std)}),
        "modellego.output": "concern scores" if manifest.head else "logits",
    }
    if manifest.assembly is not None:
        meta["modellego.labels"] = json.dumps([lab.key for lab in manifest.assembly.labels])
    return meta


def _captured(net: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(net, (example,), dynamic_shapes=({0: batch},), strict=False)


def _onnx_dependencies() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"format onnx needs the packages onnx, onnxruntime and onnxscript ({exc.name} is "
            "missing); install them with  pip install 'modellego[export]'") from None
    return onnx, onnxruntime


def _write_onnx(net: nn.Module, example: torch.Tensor, tmp: str,
                meta: Mapping[str, str]) -> str:
    """Write ``net`` as ONNX to ``tmp`` with ``meta``; returns the exporter used."""
    onnx, _ = _onnx_dependencies()
    try:
        import onnxscript  # noqa: F401  (the dynamo-based exporter needs it)
    except ImportError:
        raise ExportError("format onnx needs the package onnxscript; install it with  "
                          "pip install 'modellego[export]'") from None
    exporter = "torch.onnx (dynamo)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = _captured(net, example)
            torch.onnx.export(program, (example,), tmp, dynamo=True, opset_version=ONNX_OPSET,
                              external_data=False, verbose=False)
        except ExportError:
            raise
        except Exception as dynamo_exc:  # noqa: BLE001 (the exporter raises many kinds)
            exporter = "torch.onnx (torchscript)"
            try:
                torch.onnx.export(net, (example,), tmp, dynamo=False, input_names=["images"],
                                  output_names=["logits"], opset_version=_TORCHSCRIPT_OPSET,
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            except Exception as exc:  # noqa: BLE001
                raise ExportError(
                    f"cannot export to ONNX: torch.export failed ({exception_line(dynamo_exc)}) "
                    f"and so did the TorchScript exporter ({exception_line(exc)}); export the "
                    "parts of an assembly one by one, or report the network") from None
    model = onnx.load(tmp)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "modellego"
    model.producer_version = __version__
    onnx.save(model, tmp)
    return exporter


def _run_onnx(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    _, ort = _onnx_dependencies()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    return run


def _write_pt2(net: nn.Module, example: torch.Tensor, tmp: str,
               meta: Mapping[str, str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = _captured(net, example)
        except Exception as exc:  # noqa: BLE001 (torch.export raises many kinds)
            raise ExportError(f"cannot export to pt2: torch.export failed "
                              f"({exception_line(exc)}); try format onnx, which falls back to "
                              "the TorchScript exporter") from None
    buffer = io.BytesIO()  # torch.export wants a buffer or a name ending in .pt2
    torch.export.save(program, buffer,
                      extra_files={_EXTRA: json.dumps(dict(meta), sort_keys=True)})
    Path(tmp).write_bytes(buffer.getvalue())
    return "torch.export"


def _run_pt2(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)
    return run


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The modellego metadata of an exported file (ONNX or ``.pt2``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        onnx, _ = _onnx_dependencies()
        model = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in model.metadata_props if p.key.startswith("modellego.")}
    extra = {_EXTRA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.load(io.BytesIO(path.read_bytes()), extra_files=extra)
    return dict(json.loads(extra[_EXTRA]))


def _batches(n: int) -> tuple[int, ...]:
    """Two batch sizes the check runs at: the dynamic batch is exercised, not only traced."""
    return (1, min(n, 32)) if n > 1 else (1,)


def _compare(run: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, images: torch.Tensor,
             batches: Sequence[int]) -> tuple[float, float]:
    """The largest absolute difference of ``run``'s outputs from ``net``'s on ``images`` at
    each batch size, and the largest absolute output of ``net``."""
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            chosen = images[:8] if b == 1 else images  # batch 1: a few images show it runs
            for i in range(0, len(chosen), b):
                x = chosen[i:i + b].contiguous()
                want = net(x).float()
                got = run(x).float()
                if got.shape != want.shape:
                    return float("inf"), 0.0
                diff = (got - want).abs().max().item() if got.numel() else 0.0
                if diff != diff:  # NaN
                    return float("inf"), 0.0
                worst = max(worst, diff)
                scale = max(scale, want.abs().max().item() if want.numel() else 0.0)
    return worst, scale


def export_model(model: nn.Module, manifest: Manifest, out: str | Path, *, format: str = "onnx",
                 images: torch.Tensor | None = None, check_source: str | None = None,
                 text: str | None = None, max_diff: float = MAX_DIFF,
                 align: int = ALIGN) -> ExportReport:
    """Export ``model`` (described by ``manifest``) to ``out`` in ``format`` (onnx or pt2)
    and check it.

    Args:
        model: the network.
        manifest: its typed manifest.
        out: the file to write.
        format: ``"onnx"`` or ``"pt2"``.
        images: ``[0, 1]`` images of the contract's shape to check on.
        check_source: what ``images`` are, for the report.
        text: the manifest as stored in its file.
        max_diff: the largest difference allowed, relative to the largest logit.
        align: pad channel counts to multiples of this (1: as they are).

    Returns:
        The :class:`~modellego.exporting.ExportReport`.

    ``images`` are ``[0, 1]`` images of the contract's shape to check on (default: 64 seeded
    random ones), ``check_source`` says what they are; ``text`` is the manifest as stored in
    its file (for the recorded SHA-256). Channel counts are padded to multiples of ``align``
    (1: as they are; assemblies are exported as they are) by channels that change nothing
    (:func:`~modellego.surgery.align.align_channels`); the check compares the export with the
    network as given. Export runs on the CPU: ``model`` is moved there.
    Returns an :class:`ExportReport`; raises :class:`ExportError` (nothing written) when the
    network cannot be exported or its export differs by more than ``max_diff`` times
    max(1, the largest absolute logit)."""
    from .io import atomic_write

    fmt = format
    if fmt not in FORMATS:
        raise ExportError(f"`format` {fmt!r} is not a format modellego exports; choose one of "
                          f"{', '.join(FORMATS)}")
    started = time.perf_counter()
    shape = tuple(manifest.input.shape)
    if images is None:
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(CHECK_IMAGES, *shape, generator=gen)
        check_source = check_source or "random images"
    check_source = check_source or "given images"
    images = images.detach().to("cpu", torch.float32)
    if images.dim() != 4 or tuple(images.shape[1:]) != shape or len(images) == 0:
        raise ExportError(f"check images of shape {tuple(images.shape)} do not match the "
                          f"model's input (N, {', '.join(map(str, shape))}); give [0, 1] images "
                          "of that shape")
    from .surgery.align import Alignment, align_channels

    if align < 1:
        raise ExportError(f"`align` must be at least 1, got {align}")
    reference = ContractInput(model, manifest.input.mean, manifest.input.std).to("cpu").eval()
    if manifest.assembly is not None and align > 1:
        alignment = Alignment(align, 0, 0, "assemblies are exported as they are")
        exported = model
    else:
        exported, alignment = align_channels(model.to("cpu"), shape, align)
    net = ContractInput(exported, manifest.input.mean, manifest.input.std).to("cpu").eval()
    meta = export_metadata(manifest, text)
    example = images[:2] if len(images) >= 2 else images.expand(2, *shape)
    batches = _batches(len(images))
    found: dict[str, Any] = {}

    def write(tmp: str) -> None:
        if fmt == "onnx":
            found["exporter"] = _write_onnx(net, example.contiguous(), tmp, meta)
            run = _run_onnx(tmp)
        else:
            found["exporter"] = _write_pt2(net, example.contiguous(), tmp, meta)
            run = _run_pt2(tmp)
        diff, scale = _compare(run, reference, images, batches)
        found["diff"], found["tolerance"] = diff, max_diff * max(1.0, scale)
        if not diff <= found["tolerance"]:
            raise ExportError(
                f"the {fmt} export of {manifest.kind} differs from modellego's outputs by "
                f"{diff:.3g} (max |logit difference| on {len(images)} {check_source}; at most "
                f"{found['tolerance']:.3g} is accepted: {max_diff:g} x max(1, largest "
                f"|logit|)); nothing was written to {out}; report the network")

    with torch.no_grad():
        atomic_write(out, write)
    return ExportReport(str(out), fmt, found["exporter"], len(images), check_source, batches,
                        float(found["diff"]), float(found["tolerance"]),
                        meta["modellego.manifest_sha256"],
                        shape, round(time.perf_counter() - started, 3),  # type: ignore[arg-type]
                        alignment.multiple, alignment.channels_added, alignment.spaces_padded,
                        alignment.reason)


def check_set(manifest: Manifest, *, count: int = CHECK_IMAGES,
                 data_dir: Any = None) -> tuple[torch.Tensor | None, str]:
    """Up to ``count`` test images (a seeded draw) of the model's data as its export reads
    them (``[0, 1]``, the contract's shape), and where they come from; ``(None, reason)``
    when the data cannot be read."""
    from .data.base import convert_images
    from .data.lazy import as_tensor
    from .data.registry import load_split_for

    shape = manifest.input.shape
    try:
        if manifest.assembly is not None:
            from .assembly.core import union_test_set

            x, _ = union_test_set(manifest.to_dict(), data_dir=data_dir)
            source = "test images of the parts' datasets"
        elif manifest.dataset is None:
            return None, "random images (the manifest names no dataset)"
        else:
            test = load_split_for(manifest.dataset.to_dict(), "test", data_dir=data_dir)
            x = None
            source = f"test images of {manifest.dataset.name}"
    except DataError as exc:
        return None, f"random images (the test data could not be read: {exc})"
    gen = torch.Generator().manual_seed(0)
    total = len(x) if x is not None else len(test)
    idx = torch.randperm(total, generator=gen)[:count].sort().values
    if x is None:
        x = convert_images(as_tensor(test.images[idx], "the export check"), shape[0], shape[1:])
    else:
        x = x[idx]
    return x.float(), source


def export(path: str | Path, out: str | Path, *, format: str | None = None,
           check_images: int = CHECK_IMAGES, data_dir: Any = None, align: int = ALIGN,
           trust_code: Sequence[str] | str | None = None) -> ExportReport:
    """Export the model file ``path`` to ``out`` (``format``, or from ``out``'s suffix,
    ``.onnx`` or ``.pt2``), checked on ``check_images`` test images (see the module docstring).

    Args:
        path: the model file.
        out: the file to write.
        format: ``"onnx"`` or ``"pt2"`` (default: from ``out``'s suffix).
        check_images: how many test images the check runs on.
        data_dir: where the dataset's files are.
        align: pad channel counts to multiples of this (1: as they are).
        trust_code: modules a ``python:`` architecture may import.

    Returns:
        The :class:`~modellego.exporting.ExportReport`.
    """
    from .files import open_model
    from .io import raw_header

    fmt = format or _format_of(out)
    if not 1 <= check_images <= MAX_CHECK_IMAGES:
        raise ExportError(f"`check_images` must be between 1 and {MAX_CHECK_IMAGES}, got "
                          f"{check_images}")
    loaded = open_model(path, trust_code=trust_code)
    header, _, _ = raw_header(Path(path))
    text = header["__metadata__"]["modellego"]
    images, source = check_set(loaded.manifest, count=check_images, data_dir=data_dir)
    if images is not None and len(images) == 0:
        images, source = None, "random images (the test split has no images)"
    return export_model(loaded.model, loaded.manifest, out, format=fmt, images=images,
                        check_source=source, text=text, align=align)


def _format_of(out: str | Path) -> str:
    suffix = Path(out).suffix.lstrip(".").lower()
    if suffix not in FORMATS:
        raise ExportError(f"cannot tell the format of {out} from its suffix; name it .onnx or "
                          ".pt2, or give `format`")
    return suffix
