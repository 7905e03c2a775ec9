"""megatron_rcm: rCM (score-regularized continuous-time consistency) distillation on Megatron-Core.

Importing this package needs neither a GPU, Transformer Engine nor apex.
"""

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _alias_source_kernels() -> None:
    """``kernels/`` ships as ``megatron_rcm.kernels`` (setup.py's package_dir). A source checkout on
    ``sys.path`` ahead of the install (or setuptools' compat editable mode) does not see that mapping:
    then load ``<checkout>/kernels`` under the same name."""
    if _ilu.find_spec("megatron_rcm.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(src, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location("megatron_rcm.kernels", init, submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules["megatron_rcm.kernels"] = module
    spec.loader.exec_module(module)


_alias_source_kernels()
