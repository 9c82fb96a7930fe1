"""Hugging Face model helpers (`hf`: loading, tokenizer checks, logits, heads) and the
lean decoder forward (`lean`, the default `auto` where its check passes)."""
