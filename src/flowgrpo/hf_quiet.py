"""Keep the command line's output to flowgrpo's own lines and real warnings.

Three kinds of third-party output carry no information for a flowgrpo run and are removed where
they start: diffusers' deprecation of `torch_dtype` (we pass the argument each installed version
expects), transformers' notice that an image processor falls back to its PIL backend when
torchvision is absent (the diffusion models never use one; torchvision is deliberately not a
dependency), and the per-component weight-loading progress bars of both libraries (a folder loads
in well under a second on the shapes models; the Hub's download bars are left on).
"""

from __future__ import annotations

import functools
import logging


@functools.cache
def diffusers_dtype_key() -> str:
    """`dtype` where diffusers has replaced `torch_dtype` with it, else `torch_dtype`."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


@functools.cache
def transformers_dtype_key() -> str:
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class _DropPilFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


@functools.cache
def quiet_third_party() -> None:
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropPilFallbackNotice())
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        # transformers switches the Hub's download bars off with its own: downloads keep theirs
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    except ImportError:
        pass
