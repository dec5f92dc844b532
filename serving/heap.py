"""Keep Python's cyclic garbage collector off the request path of the long-running servers.

A full (generation 2) collection walks every live object: ~30 ms in the API with the embedded feature store
loaded, ~190 ms in the local endpoint with a TensorFlow model loaded (measured on the 2-core dev machine). It
runs whenever enough objects have survived younger collections, i.e. now and then in the middle of a request,
and was most of the serving benchmark's p99. ``settle()`` after start-up (and after a model reload) collects once
and moves everything alive into the permanent generation (``gc.freeze``), so later collections only walk what
requests allocate.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("marketrank.heap")


def settle(reason: str) -> float:
    """Collect everything, then freeze what is left; returns the pause in ms (paid here, once)."""
    started = time.perf_counter()
    gc.unfreeze()  # what an earlier settle() froze may be garbage now (a replaced model version)
    gc.collect()
    gc.freeze()
    pause_ms = (time.perf_counter() - started) * 1000
    log.info("heap settled after %s: %d objects frozen, %.0f ms", reason, gc.get_freeze_count(), pause_ms)
    return pause_ms
