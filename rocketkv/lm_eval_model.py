"""``import rocketkv.lm_eval_model`` registers lm-eval's ``rocketkv`` model (``rocketkv.harness.lm_eval_model``)."""
from rocketkv.harness.lm_eval_model import BridgeError, RocketKVLM

__all__ = ["BridgeError", "RocketKVLM"]
