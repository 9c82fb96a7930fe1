"""Hugging Face model helpers (`hf`: loading, tokenizer checks, logits, heads) and the
opt-in lean decoder forward (`lean`)."""
