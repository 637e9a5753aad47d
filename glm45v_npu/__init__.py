"""glm45v-npu: a lightweight, fast inference runner for GLM-4.5V."""

from .llm import LLM, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
