"""One call to set the sanitizer up in a plain training loop (in the style of Opacus' ``make_private``)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from sanitizer.core import KeptLoader, Sanitizer
from sanitizer.errors import SanitizerError


class SanitizedLoader(KeptLoader):
    """A DataLoader over the kept examples in which every pass is one epoch.

    ``iter(loader)`` (the start of ``for x, y in loader:``) first calls
    ``loader.sanitizer.start_epoch(loader.sanitizer.epoch + 1)``, which runs a sanitization round when
    one is due. After ``loader.sanitizer.load_state_dict(...)`` the next pass is the epoch after the
    saved one, so a resumed run continues where it stopped. Built by :func:`attach`; do not call
    ``start_epoch`` yourself, and do not iterate the loader for anything but a training epoch.

    Example::

        loader = sanitizer.attach(model, DataLoader(train_set, batch_size=128, shuffle=True), epochs=30)
        for epoch in range(30):
            for x, y in loader:          # epoch 0, 1, ...: rounds run by themselves
                ...
    """

    def __iter__(self):
        self.sanitizer.start_epoch(self.sanitizer.epoch + 1)
        return super().__iter__()  # refuses an epoch without batches


def attach(model: nn.Module, loader: DataLoader, *, embed_dataset: Dataset | None = None, epochs: int | None = None,
           **options: Any) -> SanitizedLoader:
    """Build a :class:`~sanitizer.Sanitizer` on ``loader.dataset`` and return the loader it drives.

    The returned loader keeps ``loader``'s batch size, workers, collate function and shuffling, visits
    only the kept examples, and runs the due sanitization round at the start of every pass (see
    :class:`SanitizedLoader`). The sanitizer is ``loader.sanitizer`` (``.dropped``, ``.history``,
    ``.state_dict()``). ``options`` are any other :class:`~sanitizer.Sanitizer` keywords
    (``policy=``, ``to_xy=``, ``warmup=``, ...).

    Example::

        import sanitizer

        loader = sanitizer.attach(model, DataLoader(train_set, batch_size=128, shuffle=True),
                                  embed_dataset=train_set_without_augmentation, epochs=epochs)
        for epoch in range(epochs):
            for x, y in loader:                 # only kept examples; rounds run by themselves
                ...
        print(loader.sanitizer.dropped)
    """
    if not isinstance(loader, DataLoader):
        raise SanitizerError(f"attach takes a torch.utils.data.DataLoader, got {type(loader).__name__}; build one "
                             "with DataLoader(train_set, batch_size=..., shuffle=True)")
    sanitizer = Sanitizer(model, loader.dataset, embed_dataset=embed_dataset, epochs=epochs, **options)
    return sanitizer._wrap(loader, SanitizedLoader)
