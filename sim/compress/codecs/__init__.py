"""One module per codec; :mod:`sim.compress.registry` imports every one of them."""
