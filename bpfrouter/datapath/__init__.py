"""Layer 1: the data plane as typed, pinned objects (load, attach, maps)."""
from .datapath import (Datapath, DatapathError, RouterMeta, default_object, running_routers,
                       validate_name, check_bpffs, PIN_ROOT, RUN_ROOT)
from . import layout

__all__ = ["Datapath", "DatapathError", "RouterMeta", "default_object", "running_routers",
           "validate_name", "check_bpffs", "layout", "PIN_ROOT", "RUN_ROOT"]
