"""Foreign checkpoints -> self-describing cmkd checkpoints (``cmkd import``).

Each converter returns an :class:`Imported`: the classifier's state dict, its gin config and
the front-end settings, so ``cmkd.models.factory.load_model`` rebuilds it like any trained
stage. Supported: transformers' ``ASTForAudioClassification`` (hub id or folder), the AST
release's ``.pth`` (YuanGongND/ast) and PSLA's EfficientNet ``.pth`` (YuanGongND/psla).
"""

from cmkd.models.convert.common import ConvertError, Imported
from cmkd.models.convert.detect import FORMATS, import_source

__all__ = ["ConvertError", "Imported", "FORMATS", "import_source"]
