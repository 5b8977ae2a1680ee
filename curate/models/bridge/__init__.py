"""The bootstrapped model family: small trainable bridges between frozen unimodal models.

BLIP-2's idea at the scale of this machine: a frozen image encoder (EfficientNet-Lite0),
a frozen text encoder (all-MiniLM-L6-v2) and a frozen language model
(SmolLM2-135M-Instruct), all shipped inside registry packages, joined by small bridges
that are trained here and saved with ``save_pretrained`` in safetensors.
"""

from curate.models.bridge.captioner import BridgeCaptionerConfig, BridgeCaptionerModel
from curate.models.bridge.captioner import register as _register_captioner
from curate.models.bridge.filter import BridgeFilterConfig, BridgeFilterModel
from curate.models.bridge.filter import register as _register_filter

_register_filter()  # AutoConfig/AutoModel load a bridge filter directory by path, no remote code
_register_captioner()  # the same for a bridge captioner directory

__all__ = ["BridgeCaptionerConfig", "BridgeCaptionerModel", "BridgeFilterConfig", "BridgeFilterModel"]
