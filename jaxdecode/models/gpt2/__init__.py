"""GPT-2 (transformers' `GPT2LMHeadModel`): config, model, checkpoint names, sharding."""

from jaxdecode.models.gpt2 import convert
from jaxdecode.models.gpt2.config import GPT2Config
from jaxdecode.models.gpt2.model import LM_HEAD_T, GPT2LMHeadModel, gpt2_decoder, init_params
from jaxdecode.models.gpt2.sharding import gpt2_param_specs
from jaxdecode.models.layers import ACTIVATIONS
from jaxdecode.models.registry import Family

__all__ = [
    "ACTIVATIONS",
    "FAMILY",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LM_HEAD_T",
    "gpt2_decoder",
    "gpt2_param_specs",
    "init_params",
]

FAMILY = Family(
    name="GPT-2",
    model_types=("gpt2",),
    config_class=GPT2Config,
    decoder=gpt2_decoder,
    params_from_state_dict=convert.params_from_state_dict,
    state_dict_from_params=convert.state_dict_from_params,
    param_specs=gpt2_param_specs,
    init_params=init_params,
    param_path=convert.param_path,
)
