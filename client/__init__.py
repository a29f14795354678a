"""The Swarm client: a transformers-compatible model whose blocks run on volunteer peers.

    from client import DistributedModelForCausalLM
    model = DistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])
    model.generate(input_ids, max_new_tokens=20)
"""

from client.config import ClientConfig
from client.model import DistributedModelForCausalLM

__all__ = ["DistributedModelForCausalLM", "ClientConfig"]
