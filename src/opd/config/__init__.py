"""Configuration: the typed sections (`sections`; sampling, vLLM and rollouts: `rollouts`), `TrainConfig` with YAML and `key=value`
parsing (`parse`), named presets (`presets`), combination checks (`checks`), the `opd config`
listing (`docs`), which optional extra a feature needs (`extras`) and several teachers in one
run (`teachers`: `teachers:` and `routing:`).

`opd.config` is the public name: `from opd.config import TrainConfig` works; the modules
inside import from `opd.config.sections` / `opd.config.parse` directly."""

from opd.config.parse import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    field_type,
    load_config,
    parse_override,
    read_config_file,
)
from opd.config.presets import PRESETS
from opd.config.rollouts import RolloutsConfig, SamplingConfig, VllmConfig
from opd.config.sections import (
    DEFAULT_TOPK,
    METRICS,
    DataConfig,
    Divergence,
    DType,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SourceConfig,
)
from opd.config.teachers import RoutingConfig, TeacherConfig

__all__ = [
    "DEFAULT_TOPK", "METRICS", "PRESETS", "DType", "DataConfig", "Divergence", "LoraConfig",
    "LossConfig", "ModelConfig", "OptimConfig", "RewardConfig", "RolloutsConfig", "RoutingConfig",
    "SamplingConfig", "SourceConfig",
    "TeacherConfig", "TrainConfig", "VllmConfig", "config_from_dict", "config_to_dict",
    "field_type", "load_config", "parse_override", "read_config_file",
]
