"""The teacher sections: `teacher:` (TeacherConfig), and `teachers:` + `routing:` for several
named teachers in one run, resolved when the config is built.

One entry is exactly `teacher:` (the run is the same, bit for bit). Several set
`teacher.kind=routed`: the run builds each teacher and a `opd.teachers.routing.RoutedTeacher`
that sends each row to the one `routing` names. Whatever a teacher cannot serve for the
run's loss is refused here, naming the teacher.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from opd.config.fields import _check_choices, _check_template, _in_range
from opd.config.sections import DType

if TYPE_CHECKING:
    from opd.config.parse import TrainConfig

@dataclass
class TeacherConfig:
    """The teacher: what scores the sequences.

    Attributes:
        kind: local model | self (the student with privileged context) | remote server |
            cached log-probs from `opd generate` / `opd score` | vllm (a local vLLM engine
            scoring with prompt_logprobs: pg and topk estimators only) | routed (set by
            `teachers:` naming several; not written by hand)
        path: local: model directory or hub id
        dtype: local: dtype the teacher's weights are loaded in
        url: remote: base URL of an `opd serve` or vLLM server
        urls: remote: several servers of one teacher (replicas), instead of url: each
            request goes to the least-loaded healthy one, a failed one's to another
        overlap: remote: score micro-batch i+1 while micro-batch i is back-propagated
            (same losses; false: score each just before its backward)
        api_key_env: remote: environment variable holding the server's bearer token
        timeout_s: remote: seconds one request may take, its whole answer included (a body
            that trickles cannot extend it), before a retry
        max_retries: remote: retries before the run stops (its checkpoint intact)
        cache_dir: cached: the cache directory (default: data.train when that is a cache)
        privileged_template: self (OPSD/SDFT): the teacher's prompt; {prompt} is the row's
            data.prompt_field text, any other {name} is that column of the row (the
            privileged context the student lacks)
        self_weights: self: frozen (the start) | ema | live (the current weights, no gradient)
        ema_decay: self_weights=ema: theta_bar <- d*theta_bar + (1-d)*theta per step
        shard: local, multi-process runs: shard the teacher's weights over the ranks (FSDP2)
            instead of one full copy per rank
    """

    kind: Literal["local", "self", "remote", "cached", "vllm", "routed"] = "local"
    path: str = ""
    dtype: DType = "float32"
    url: str = ""
    urls: list[str] = field(default_factory=list)
    overlap: bool = True
    api_key_env: str = "OPD_TEACHER_TOKEN"
    timeout_s: float = 60.0
    max_retries: int = 5
    cache_dir: str = ""
    privileged_template: str = "{prompt}\nReference solution: {answer}\n"
    self_weights: Literal["frozen", "ema", "live"] = "frozen"
    ema_decay: float = 0.99
    shard: bool = False

    def __post_init__(self):
        _check_choices(self)
        _in_range("teacher.ema_decay", self.ema_decay, 0.0, 1.0)
        _check_template("teacher.privileged_template", self.privileged_template)  # any kind
        _in_range("teacher.timeout_s", self.timeout_s, 0.0, lo_open=True)
        _in_range("teacher.max_retries", self.max_retries, 0)
        if self.shard and self.kind != "local":
            raise ValueError("teacher.shard applies to teacher.kind='local' only")
        if self.url and self.urls:
            raise ValueError("set teacher.url (one server) or teacher.urls (replicas), not both")

    @property
    def servers(self) -> list[str]:
        """remote: the teacher's server URLs (teacher.urls, else teacher.url)."""
        return list(self.urls) if self.urls else [self.url] if self.url else []


# top-k log-probs at temperature 1 only: no full logits
SPARSE_KINDS = ("remote", "cached", "vllm")


@dataclass
class RoutingConfig:
    """Which of several teachers (`teachers:`) scores each row: by a column, or a fixed mix.

    Attributes:
        key: the data column whose value picks each row's teacher through `map`
        map: column value -> teacher name
        default: the teacher of a row whose value `map` does not list ('': such a row is
            refused, naming the known values)
        mix: teacher name -> weight, instead of a column: each row's teacher is drawn by a
            hash of (seed, its tokens), so a resumed run routes every row as before
    """

    key: str = ""
    map: dict[str, str] = field(default_factory=dict)
    default: str = ""
    mix: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.key and self.mix:
            raise ValueError("routing: set key (with map) or mix, not both")
        for name, weight in self.mix.items():
            _in_range(f"routing.mix.{name}", weight, 0.0, lo_open=True)


def resolve_teachers(config: TrainConfig) -> None:
    """Check `teachers` and `routing`, and set `config.teacher` from them."""
    teachers, routing = config.teachers, config.routing
    if not teachers:
        if routing != RoutingConfig():
            raise ValueError("routing applies to several teachers: set teachers: {name: {...}}")
        if config.teacher.kind == "routed":
            raise ValueError("teacher.kind=routed is set by teachers: (several teachers)")
        return
    for name, teacher in teachers.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"teachers.{name}: a teacher's name is letters, digits and _")
        if teacher.kind == "routed":
            raise ValueError(f"teachers.{name}.kind=routed: give each teacher a real kind")
    derived = next(iter(teachers.values())) if len(teachers) == 1 else TeacherConfig("routed")
    if config.teacher not in (TeacherConfig(), derived):
        raise ValueError(
            "set teacher: (one teacher) or teachers: (several, by name), not both; "
            f"teachers: lists {', '.join(teachers)}"
        )
    if len(teachers) == 1:
        if routing != RoutingConfig():
            raise ValueError("routing needs at least two teachers in teachers:")
        config.teacher = derived
        return
    check_routing(routing, list(teachers))
    for name, teacher in teachers.items():
        check_serves(config, name, teacher)
    config.teacher = derived


def check_routing(routing: RoutingConfig, names: list[str]) -> None:
    known = ", ".join(names)
    if not routing.key and not routing.mix:
        raise ValueError(
            f"teachers: {known}: set routing.key (a data column, with routing.map) or "
            "routing.mix (teacher -> weight) to say which teacher scores each row"
        )
    used = [*routing.map.values(), *([routing.default] if routing.default else []), *routing.mix]
    for name in used:
        if name not in names:
            raise ValueError(f"routing names teacher {name!r}, not one of teachers: {known}")
    if routing.key and not routing.map and not routing.default:
        raise ValueError(f"routing.key={routing.key!r} needs routing.map (value -> teacher)")


def check_serves(config: TrainConfig, name: str, teacher: TeacherConfig) -> None:
    """Refuse a loss this teacher cannot serve, naming the teacher."""
    loss = config.loss
    if teacher.kind in SPARSE_KINDS and loss.objective == "kd" and loss.estimator == "full":
        raise ValueError(
            f"teachers.{name} (kind {teacher.kind}) returns token and top-k log-probs, not "
            "full logits: set loss.estimator=topk or loss.objective=pg"
        )
    if teacher.kind == "self":
        raise ValueError(f"teachers.{name}: kind=self is not available among several teachers")
    try:  # the run's own checks, as if this teacher were the only one
        dataclasses.replace(config, teacher=teacher, teachers={}, routing=RoutingConfig())
    except ValueError as err:
        raise ValueError(f"teachers.{name}: {err}") from None


def teacher_configs(config: TrainConfig) -> dict[str, TrainConfig]:
    """Each of `teachers`' run config: the run's, with `teacher` that teacher's section."""
    return {
        name: dataclasses.replace(config, teacher=t, teachers={}, routing=RoutingConfig())
        for name, t in config.teachers.items()
    }
