"""cmkd plugin: importing it registers ``@backbones.crnn``."""

from cmkd_crnn.crnn import CRNN, crnn

__all__ = ["CRNN", "crnn"]
