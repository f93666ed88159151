"""A device bundle: what ``edgefl fleet add-device ID`` gives one device.

The directory holds ``bundle.json`` (fleet, client id, broker URL, user name and the names of the
other files), ``password`` (mode 0600), ``ca.crt`` (the fleet's CA, to verify the broker) and
``trust.json`` (the server's public keys the device pins). ``edgefl client --bundle DIR`` reads
it; paths inside are relative to the bundle, so it can be copied anywhere.
"""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import KeyFileError


@dataclass(frozen=True)
class DeviceBundle:
    """A device's provisioning, read from its bundle directory."""

    directory: Path
    fleet: str
    client_id: str
    broker: str
    username: str
    password: str
    ca_certs: Path
    trust_file: Path


def load_bundle(directory) -> DeviceBundle:
    """Read the bundle in ``directory``.

    Raises
    ------
    KeyFileError
        If a file is missing or malformed (a revoked device's bundle has no ``bundle.json``), or
        the password file is readable by other users.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "bundle.json").read_text())
        password_file = directory / meta["password_file"]
        if stat.S_IMODE(password_file.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{password_file} is accessible to other users: run "
                               f"`chmod 600 {password_file}`")
        return DeviceBundle(directory, meta["fleet"], meta["client_id"], meta["broker"],
                            meta["username"], password_file.read_text().strip(),
                            directory / meta["ca_certs"], directory / meta["trust"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, KeyFileError):
            raise
        raise KeyFileError(f"{directory} is not a usable device bundle ({type(exc).__name__}: "
                           f"{exc}); write one with `edgefl fleet add-device ID` (a revoked "
                           "device needs a new one)") from None
