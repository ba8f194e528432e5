"""STGP (prompt-based spatio-temporal graph transfer): pure-torch model pieces.

No Ray and no training loops here: engines import these.
"""

from stgray.nn.stgp.decoder import STGPDecoder
from stgray.nn.stgp.encoder import GraphormerBias, STGPEncoder, STGraph
from stgray.nn.stgp.model import (STAGES, STGPModel, STGPModelConfig, count_parameters,
                                  masked_mae)
from stgray.nn.stgp.prompts import PromptBank
from stgray.nn.stgp.template import TASKS, PatchTemplate, STBatch, node_mask

__all__ = ["STAGES", "TASKS", "GraphormerBias", "PatchTemplate", "PromptBank", "STBatch",
           "STGPDecoder", "STGPEncoder", "STGPModel", "STGPModelConfig", "STGraph",
           "count_parameters", "masked_mae", "node_mask"]
