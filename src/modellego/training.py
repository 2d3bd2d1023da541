"""Training of zoo architectures on registered datasets (the source models to take apart)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ._version import __version__
from .data import Split, as_tensor, load_split, model_input, normalize
from .data.fingerprint import split_fingerprint
from .errors import ModelLegoError, TrainingError
from .manifest import Manifest
from .metrics import accuracy_from_logits, predict_logits
from .models import create_model
from .runtime.device import device_of, on_current_device, to_device_of
from .surgery.trace import attention_leaf
from .terminal import Progress

# Datasets whose classes survive a horizontal flip (clothes, objects; not digits).
_FLIP_OK = ("fashion-mnist", "cifar10", "cifar100")
#: The seeds torch's generators accept (``torch.manual_seed``): a signed or unsigned 64-bit int.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def check_seed(seed: int, flag: str = "`seed`") -> None:
    """Refuse a seed outside :data:`SEED_RANGE` (torch would raise a RuntimeError)."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not lo <= seed <= hi:
        raise ModelLegoError(f"{flag} must be an integer from {lo} to {hi} (what torch's "
                             f"random generators accept), got {seed}; pick a smaller seed")


def check_lr(lr: float, flag: str = "`lr`") -> None:
    """Refuse a learning rate that is not a finite number > 0."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ModelLegoError(f"{flag} must be a finite number > 0, got {lr}; e.g. 0.05")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    arch: str
    dataset: str
    epochs: int = 10
    classes: tuple[int, ...] | None = None
    width: float = 1.0
    batch_size: int = 128
    #: ``None``: the optimizer's (:data:`OPTIMIZERS`)
    lr: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    augment: bool = True
    data_dir: str | None = None
    #: the size (H, W) a ``folder:PATH`` dataset is read at (``None``: its own; see
    #: :mod:`modellego.data.folder`)
    image_size: tuple[int, int] | None = None
    #: ``"sgd"``, ``"adamw"`` or ``"auto"``: AdamW for a network with attention layers
    #: (transformers train poorly with SGD), SGD for the others
    optimizer: str = "auto"

    def validate(self) -> None:
        if self.epochs < 1:
            raise ModelLegoError(f"`epochs` must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ModelLegoError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.lr is not None:
            check_lr(self.lr)
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ModelLegoError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("auto",) + tuple(OPTIMIZERS):
            raise ModelLegoError(f"unknown `optimizer` {self.optimizer!r}; use one of "
                                 f"{', '.join(('auto',) + tuple(OPTIMIZERS))}")
        check_seed(self.seed)

    def resolved(self, model: torch.nn.Module) -> TrainConfig:
        """This config with the optimizer, learning rate and weight decay it trains
        ``model`` with (what the manifest records)."""
        name = self.optimizer
        if name == "auto":
            name = "adamw" if any(attention_leaf(m) for m in model.modules()) else "sgd"
        lr, decay = OPTIMIZERS[name]
        return replace(self, optimizer=name, lr=self.lr if self.lr is not None else lr,
                       weight_decay=self.weight_decay if self.weight_decay is not None
                       else decay)


#: optimizer -> its default (learning rate, weight decay); both run the one-cycle schedule
OPTIMIZERS = {"sgd": (0.05, 5e-4), "adamw": (1e-3, 0.05)}


def task_split(split: Split, classes: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images and labels remapped to output indices (position in ``classes``)."""
    if classes is None:
        return normalize(as_tensor(split.images, "training"), split.info), split.labels
    sub = split.subset(classes)
    lookup = torch.full((split.info.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(list(classes))] = torch.arange(len(classes))
    return normalize(as_tensor(sub.images, "training"), sub.info), lookup[sub.labels]


def _augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops (zero padding ``pad``) and optional horizontal flips, vectorised."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]
    out = xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        out[mask] = out[mask].flip(-1)
    return out.contiguous()


def train(config: TrainConfig, *, command: str | None = None,
          progress: bool = True, fingerprint: bool = True
          ) -> tuple[torch.nn.Module, Manifest]:
    """Train ``config.arch`` on ``config.dataset``; keep the epoch best on the validation split.

    Args:
        config: the architecture, dataset and training.
        command: the command line recorded in the provenance.
        progress: show a progress bar.
        fingerprint: give the model its router fingerprint.

    Returns:
        ``(model, manifest)``.

    Returns the model (eval mode) and its manifest, ready for :func:`modellego.save_model`;
    with ``fingerprint``, the manifest has the model's router fingerprint (its tensors are
    kept with the model, see :func:`modellego.disassemble`).
    """
    config.validate()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train_split = load_split(config.dataset, "train", data_dir=config.data_dir,
                            image_size=config.image_size)
    val_split = load_split(config.dataset, "val", data_dir=config.data_dir,
                            image_size=config.image_size)
    info = train_split.info
    classes = tuple(config.classes) if config.classes is not None else tuple(
        range(info.num_classes))
    check_classes(classes, info.num_classes, "`classes`")
    x_train, y_train = task_split(train_split, classes)
    x_val = normalize(as_tensor(val_split.subset(classes).images, "training"), info)
    y_val = val_split.subset(classes).labels
    if len(y_val) == 0 or len(y_train) == 0:
        raise ModelLegoError(f"dataset {config.dataset!r} has no training or validation images "
                             f"of classes {list(classes)}; add images or choose other classes")
    c, h, w = info.input_shape
    kwargs: dict[str, Any] = {"in_channels": c, "num_classes": len(classes),
                              "input_size": h, "width": config.width}
    model = create_model(config.arch, **kwargs)
    config = config.resolved(model)
    assert config.lr is not None and config.weight_decay is not None
    pad, flip = augmentation(config.dataset, h, config.augment)
    best_acc, best_epoch, history = fit(
        model, x_train, y_train, x_val, y_val, classes, epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        pad=pad, flip=flip, gen=gen, progress=progress, optimizer=config.optimizer)
    test_all = load_split(config.dataset, "test", data_dir=config.data_dir,
                            image_size=config.image_size)
    test = test_all.subset(classes)
    test_acc = accuracy_from_logits(predict_logits(model, model_input(test.images, info)),
                                    test.labels, classes)
    cfg = asdict(config)
    cfg.pop("data_dir")
    manifest = Manifest.for_model(
        architecture={"name": config.arch, "kwargs": kwargs},
        dataset={**info.to_dict(), "fingerprint": {  # what later commands check data against
            s.split: split_fingerprint(s) for s in (train_split, val_split, test_all)}},
        classes=classes,
        metrics={"val_accuracy": best_acc, "test_accuracy": test_acc.accuracy,
                 "test_per_class": {str(k): v for k, v in test_acc.per_class.items()}},
        provenance={"made_by": "modellego train", "command": command, "config": cfg,
                    "best_epoch": best_epoch, "history": history,
                    "modellego_version": __version__, "torch_version": torch.__version__})
    from .assembly.fingerprint import fingerprinted

    return model, fingerprinted(model, manifest, fingerprint, data_dir=config.data_dir)


def augmentation(dataset: str, input_size: int, augment: bool) -> tuple[int, bool]:
    """Crop padding and whether to flip when training on ``dataset`` (``(0, False)``: none)."""
    flip = augment and any(dataset.startswith(d) for d in _FLIP_OK)
    return (max(1, input_size // 14) if augment else 0), flip


def task_outputs(classes: Sequence[int], output_classes: Sequence[int]
                 ) -> tuple[tuple[int, ...], list[int]]:
    """``classes`` and ``output_classes`` as ints; raises for no classes, repeated classes
    or a class that is not an output."""
    classes = tuple(int(c) for c in classes)
    output_classes = [int(c) for c in output_classes]
    if not classes:
        raise ModelLegoError("no classes given; name at least one class")
    if len(set(classes)) != len(classes):
        raise ModelLegoError(f"classes {list(classes)} contain repeats; list each class once")
    missing = [c for c in classes if c not in output_classes]
    if missing:
        raise ModelLegoError(f"classes {missing} are not outputs of the model (it classifies "
                             f"{output_classes})")
    return classes, output_classes


def check_classes(classes: Sequence[int], num_classes: int, arg: str) -> None:
    """Raise a clear error for empty, repeated or out-of-range class ids."""
    if len(classes) == 0:
        raise ModelLegoError(f"{arg}: no classes given")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ModelLegoError(f"{arg}: class ids {bad} out of range 0..{num_classes - 1}")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if list(classes).count(c) > 1})
        raise ModelLegoError(f"{arg}: class ids {dup} are repeated; list each class once")


def fit(model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
        x_val: torch.Tensor, y_val: torch.Tensor, val_classes: Sequence[int], *, epochs: int,
        batch_size: int = 128, lr: float = 0.05, weight_decay: float = 5e-4, pad: int = 0,
        flip: bool = False, gen: torch.Generator | None = None, progress: bool = True,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        optimizer: str = "sgd") -> tuple[float, int, list[dict]]:
    """SGD (Nesterov) or AdamW, one-cycle schedule, on normalised tensors; ``y_train`` are output
    indices, ``y_val`` class ids with ``val_classes[i]`` the class of output ``i``.
    ``loss_fn(logits, targets, inputs)`` replaces cross-entropy (``inputs``: the batch as
    the model saw it, after augmentation).

    Leaves ``model`` in eval mode with the weights of the epoch best on validation and
    returns (best validation accuracy, its epoch, per-epoch history).
    """
    gen = gen or torch.Generator().manual_seed(0)
    home = device_of(model)
    on_current_device(model)  # trained there (see modellego.runtime.device), returned home
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                              weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    best, best_acc, best_epoch, history = None, -1.0, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        with Progress(steps_per_epoch, f"epoch {epoch}/{epochs}", enabled=progress) as bar:
            total_loss = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                xb = x_train[idx]
                if pad:
                    xb = _augment(xb, pad, flip, gen)
                xb, yb = to_device_of(xb, model), to_device_of(y_train[idx], model)
                if loss_fn is None:
                    loss = F.cross_entropy(model(xb), yb)
                else:
                    loss = loss_fn(model(xb), yb, xb)
                if not torch.isfinite(loss):
                    raise _diverged(f"the loss is {loss.item()} at step {step + 1} of epoch "
                                    f"{epoch}", lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item()
                bar.update(loss=f"{loss.item():.3f}")
        bad = _non_finite(model)
        if bad:
            raise _diverged(f"{bad} holds non-finite values after epoch {epoch}", lr)
        val_acc = accuracy_from_logits(predict_logits(model, x_val), y_val,
                                       val_classes).accuracy
        history.append({"epoch": epoch, "loss": total_loss / steps_per_epoch,
                        "val_accuracy": val_acc})
        bar.write(f"epoch {epoch}: loss {total_loss / steps_per_epoch:.4f}, "
                  f"val accuracy {val_acc:.4f}")
        if val_acc > best_acc:
            best, best_acc, best_epoch = copy.deepcopy(model.state_dict()), val_acc, epoch
    if best is None:  # no epoch ran, or every validation accuracy was NaN
        raise ModelLegoError(f"training kept no weights: no epoch of {epochs} had a "
                             "validation accuracy to compare")
    model.load_state_dict(best)
    model.to(home).eval()
    return best_acc, best_epoch, history


def _non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer with a NaN or inf, if any."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _diverged(what: str, lr: float) -> TrainingError:
    return TrainingError(f"training diverged: {what} (learning rate {lr}); no model was "
                         "written: train again with a smaller learning rate, e.g. a tenth")
