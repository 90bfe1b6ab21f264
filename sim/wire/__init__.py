"""What crosses the network, and how it is counted.

* :mod:`.arrays` — arrays in Flower records, stream payload framing, a message's bytes;
* :mod:`.text` — token ids, lengths and loss masks;
* :mod:`.streams` — the uplink streams' records and the downlink gradient records;
* :mod:`.schema` — structural validation of replies before any decoding;
* :mod:`.messages` — every message's builder, schema and parser;
* :mod:`.ledger` — one row per message, both directions, and the network model.
"""

from .arrays import WireError, payload_bytes, wire_bytes

__all__ = ["WireError", "payload_bytes", "wire_bytes"]
