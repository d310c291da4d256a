"""gearshift.engine: the paged engine, the GGUF runner, the shared server and the CLI."""

import os

# Before anything imports torch (libgomp reads this once, at load): OpenMP workers sleep instead of
# spinning between parallel regions. With the default spin, two torch threads on two CPUs shared with
# any other busy process slow down ~6x (measured: 48 greedy steps of SmolLM2, 189 s spinning vs 34 s
# passive, on the loaded 2-core dev box); on idle cores the cost is a few microseconds per matmul.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gearshift.engine.errors import GearshiftError, InvalidRequestError, ModelLoadError
from gearshift.engine.outputs import CompletionOutput, RequestOutput
from gearshift.engine.sampling_params import SamplingParams

__all__ = [
    "CompletionOutput",
    "GearshiftError",
    "InvalidRequestError",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM and LLMEngine pull in torch and the model: import them only when asked for.
    if name == "LLM":
        from gearshift.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from gearshift.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'gearshift.engine' has no attribute {name!r}")
