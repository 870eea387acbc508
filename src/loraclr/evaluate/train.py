"""Old path of :mod:`loraclr.world.evaluator_training` (training the miniature world's evaluators is
world-specific; ``loraclr.evaluate`` stays generic), kept for scripts that still import it from here."""

import sys

from loraclr.world import evaluator_training

sys.modules[__name__] = evaluator_training  # the same module object under both names
