"""glm45v-npu: a lightweight, fast inference runner for GLM-4.5V."""

__version__ = "0.1.0"
