"""Stage 3's machinery, the pass infrastructure: Program and its edit log, the pass contract and
registry, pipeline text, the pass manager (verification, rollback), report and metrics.
Imports analysis, frontend and nn.
"""

from .contract import Pass, PassResult
from .instruments import Instrument, PassMemory, Seen
from .manager import Measure, PassFailedError, PassManager, PassRolledBackWarning, VerificationError
from .options import Range
from .pipeline import Pipeline, parse_pipeline
from .program import Edit, EditError, Program, analyze, capture
from .registry import get_pass, list_passes, list_presets, register_pass, register_preset
from .report import PassRecord, Report
from .text import PipelineError

__all__ = ["Edit", "EditError", "Instrument", "Measure", "PassMemory", "Seen", "Pass", "PassFailedError", "PassManager", "PassRecord", "PassResult",
           "PassRolledBackWarning",
           "Pipeline", "PipelineError", "Program", "Range",
           "Report", "VerificationError", "analyze", "capture", "get_pass",
           "list_passes", "list_presets", "parse_pipeline", "register_pass", "register_preset"]
