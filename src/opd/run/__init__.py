"""The training run: the loop (`loop`), its assembly (`setup`) and the decision of which path
it takes (`path`), where sequences come from (`sources`), the checks before any model loads
(`preflight`), the multi-process world (`world`), checkpoints, interrupts, progress and
metrics."""
