"""moelm: DeepSeek-style Mixture-of-Experts language models in plain PyTorch."""

from moelm.config import ConfigError, ModelConfig, load_config
from moelm.model import MoELM, MoELMOutput, Routing

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "MoELM", "MoELMOutput", "Routing", "load_config", "__version__"]
