"""The run configuration: every key declared once, one frozen :class:`SplitConfig`.

* :mod:`sim.config.keys` — the core keys (type, default, allowed values, help);
* each codec's keys — its settings dataclass in ``sim/compress/codecs/``;
* :mod:`sim.config.rules` — rules between keys;
* :mod:`sim.config.split_config` — :class:`SplitConfig`, generated from all of them;
* :mod:`sim.config.tables` — the pyproject table, the README table and ``--help`` text,
  generated from the same declarations (``python -m sim docs``);
* :mod:`sim.config.faults` — the ``fault-inject`` spec.
"""

from sim.settings import ConfigError

from .keys import TINY
from .rules import active_streams
from .split_config import SETTINGS, SplitConfig

__all__ = ["SETTINGS", "TINY", "ConfigError", "SplitConfig", "active_streams"]
