"""The run configuration: every key declared once, one frozen :class:`SplitConfig`.

* :mod:`sim.config.keys` — the core keys (type, default, allowed values, help), the default
  job's budget and :data:`FROM_SCRATCH`, the from-scratch regime's values;
* each codec's keys — its settings dataclass in ``sim/compress/codecs/``;
* :mod:`sim.config.rules` — rules between keys;
* :mod:`sim.config.split_config` — :class:`SplitConfig`, generated from all of them;
* :mod:`sim.config.tables` — the pyproject table, the README table and ``--help`` text,
  generated from the same declarations (``python -m sim docs``);
* :mod:`sim.config.faults` — the ``fault-inject`` spec.
"""

from sim.settings import ConfigError

from .keys import FROM_SCRATCH, TINY
from .rules import active_streams
from .split_config import SETTINGS, SplitConfig

__all__ = ["FROM_SCRATCH", "SETTINGS", "TINY", "ConfigError", "SplitConfig", "active_streams"]
