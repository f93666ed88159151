"""What device and server both speak (the bottom layer above the kernels).

* :mod:`~edgefl.wire.model`: the model a device trains and serves (:class:`ModelManifest`,
  :class:`Model`, :func:`mlp_logits`);
* :mod:`~edgefl.wire.protocol`: MQTT topics and the JSON control messages;
* :mod:`~edgefl.wire.update`, :mod:`~edgefl.wire.envelope` and :mod:`~edgefl.wire.refresh`:
  the binary update format, the model envelope and the model refresh (``docs/wire-format.md``),
  with :mod:`~edgefl.wire.framing` (format version, checksum) and
  :mod:`~edgefl.wire.coordinates` (sparse indices and values) they share.

The binary formats' names are re-exported here: ``from edgefl.wire import encode_update``.
"""
from edgefl.wire.envelope import (
    DEFAULT_MAX_MODEL_BYTES, MODEL_MAGIC, ModelDecodeError, decode_model, encode_model,
)
from edgefl.wire.coordinates import INDEX_CODINGS, VALUE_ENCODINGS, WIRE_VALUE_CODES, value_bytes
from edgefl.wire.framing import CHECKSUM_BYTES, FORMAT_VERSION
from edgefl.wire.refresh import (
    DEFAULT_MAX_REFRESH_BYTES, REFRESH_MAGIC, ModelRefresh, RefreshDecodeError, RefreshMismatch,
    decode_refresh, encode_refresh, weights_sha256,
)
from edgefl.wire.update import (
    DEFAULT_MAX_UPDATE_BYTES, UPDATE_MAGIC, Update, UpdateDecodeError, decode_update,
    encode_update,
)

__all__ = [
    "CHECKSUM_BYTES", "DEFAULT_MAX_MODEL_BYTES", "DEFAULT_MAX_UPDATE_BYTES", "FORMAT_VERSION",
    "INDEX_CODINGS", "MODEL_MAGIC", "UPDATE_MAGIC", "VALUE_ENCODINGS", "WIRE_VALUE_CODES",
    "ModelDecodeError", "Update", "UpdateDecodeError", "decode_model", "decode_update",
    "encode_model", "encode_update", "value_bytes",
    "DEFAULT_MAX_REFRESH_BYTES", "REFRESH_MAGIC", "ModelRefresh", "RefreshDecodeError",
    "RefreshMismatch", "decode_refresh", "encode_refresh", "weights_sha256",
]
