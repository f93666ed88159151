"""The model a device keeps across reboots: the last full model message and the refreshes since.

A device that follows compressed refreshes never receives its current version as a full
envelope, so it cannot save one it did not get. It keeps what it did get, exactly as it arrived
(``model.bin``, the last full model message, and ``refreshes/<version>.bin``, each refresh
applied since), and rebuilds its model at start-up by applying them in order, each checked
against the weight hash it carries: the saved state is trusted no more than the network (a
message that does not open or a hash that does not match ends the chain there).

After :data:`MAX_REFRESHES` refreshes the device asks for a full envelope again (one full model
per that many versions), which bounds the directory and the start-up work.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from edgefl.durable import replace_file
from edgefl.wire.model import Model
from edgefl.wire.refresh import ModelRefresh, RefreshMismatch

log = logging.getLogger(__name__)

#: Refreshes kept on top of the last full model before the device re-anchors on a full one.
MAX_REFRESHES = 256


class SavedModel:
    """``model.bin`` plus ``refreshes/`` in a device's state directory.

    Parameters
    ----------
    state_dir : path
        The device's state directory.
    """

    def __init__(self, state_dir):
        self.path = Path(state_dir) / "model.bin"
        self.refresh_dir = Path(state_dir) / "refreshes"

    @property
    def refresh_count(self) -> int:
        """Refreshes saved on top of the full model."""
        return len(self._refresh_files())

    def _refresh_files(self) -> list[Path]:
        if not self.refresh_dir.is_dir():
            return []
        return sorted(self.refresh_dir.glob("*.bin"))

    def save_full(self, message: bytes) -> None:
        """Keep ``message`` (a full model) as the new base; the refreshes before it go."""
        replace_file(self.path, message)
        for path in self._refresh_files():
            path.unlink(missing_ok=True)

    def save_refresh(self, version: int, message: bytes) -> None:
        """Keep the refresh ``message`` that produced ``version``."""
        self.refresh_dir.mkdir(exist_ok=True)
        replace_file(self.refresh_dir / f"{version:010d}.bin", message)

    def load(self, open_model: Callable[[bytes], Model],
             open_refresh: Callable[[bytes], ModelRefresh]) -> Model | None:
        """The newest model the saved messages rebuild, or None without a usable full model.

        ``open_model`` / ``open_refresh`` turn a saved message into a model or a refresh (and
        check its signature where the fleet signs); a ``ValueError`` from either, or a refresh
        whose hash does not match, ends the chain at the model before it.

        Raises
        ------
        OSError, ValueError
            If ``model.bin`` cannot be read or opened.
        """
        if not self.path.exists():
            return None
        model = open_model(self.path.read_bytes())
        for path in self._refresh_files():
            try:
                refresh = open_refresh(path.read_bytes())
                if refresh.base_version != model.version:
                    continue  # an older refresh left behind by a crash before its cleanup
                if refresh.onnx_sha256 != model.onnx_sha256:
                    raise RefreshMismatch("the refresh is for another graph")
                weights = refresh.apply(model.weights)
            except (OSError, ValueError) as exc:  # RefreshMismatch is a ValueError
                log.warning("saved refresh %s is unusable (%s); starting from version %d",
                            path.name, exc, model.version)
                break
            model = model.with_weights(weights, version=refresh.version,
                                       round_id=refresh.round_id)
        return model
