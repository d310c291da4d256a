"""gearshift.engine: the paged engine, the GGUF runner, the shared server and the CLI."""

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
