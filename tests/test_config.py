import pytest

from jaxspec.models.config import config_from_hf


def test_llama_and_qwen2_configs():
  llama = config_from_hf(dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                              rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2))
  assert (llama.head_dim, llama.group_size, llama.qkv_bias, llama.eos_token_ids) == (64, 3, False, (2,))
  qwen = config_from_hf(dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                             eos_token_id=[151645, 151643]))
  assert qwen.qkv_bias and qwen.rope_theta == 1e6 and qwen.eos_token_ids == (151645, 151643)


def test_unsupported_configs_raise():
  with pytest.raises(ValueError, match="not supported"):
    config_from_hf(dict(model_type="gpt2"))
  with pytest.raises(ValueError, match="rope type"):
    config_from_hf(dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=8, rope_scaling={"rope_type": "yarn"}))
