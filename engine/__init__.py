"""gearshift.engine: the paged engine, the GGUF runner, the shared server and the CLI."""

# How torch's and llama.cpp's OpenMP threads wait is chosen by `--thread-wait` (engine/thread_wait.py)
# before either library loads; importing this package sets nothing.
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
