"""Named presets: each sets the five choices of a known method, overridable key by key."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Kim & Rush 2016: cross-entropy on teacher-generated text.
    "seqkd": {"loss": {"objective": "ce"}, "source": {"lmbda": 0.0, "off_policy": "teacher"}},
    # Hinton et al. / supervised KD: forward KL on fixed prefixes.
    "supervised_kd": {
        "loss": {"objective": "kd", "divergence": "forward_kl", "estimator": "full"},
        "source": {"lmbda": 0.0, "off_policy": "dataset"},
    },
    # Agarwal et al. 2024: lambda-mixed sources with generalized JSD(beta).
    "gkd": {
        "loss": {"objective": "kd", "divergence": "jsd", "beta": 0.5, "estimator": "full"},
        "source": {"lmbda": 0.5, "off_policy": "dataset"},
    },
    # Thinking Machines 2025: student samples, per-token reverse-KL advantage.
    "on_policy": {"loss": {"objective": "pg"}, "source": {"lmbda": 1.0}},
    # Gu et al. 2024 (MiniLLM), without its PPO machinery: full-vocabulary reverse KL on student samples.
    "minillm_like": {
        "loss": {"objective": "kd", "divergence": "reverse_kl", "estimator": "full"},
        "source": {"lmbda": 1.0},
    },
    # Self-distillation with privileged context: the student's own model, with the reference in
    # its prompt (teacher.privileged_template), scores the student's samples. OPSD (Zhao et al.
    # 2026) uses full-vocabulary JSD; SDFT (Shenfeld et al. 2026) a per-token KL.
    "opsd": {
        "teacher": {"kind": "self"},
        "loss": {"objective": "kd", "divergence": "jsd", "beta": 0.5, "estimator": "full"},
        "source": {"lmbda": 1.0},
    },
    "sdft": {
        "teacher": {"kind": "self"},
        "loss": {"objective": "kd", "divergence": "reverse_kl", "estimator": "full"},
        "source": {"lmbda": 1.0},
    },
}

# What each preset is, for `opd config PRESET`.
PRESET_NOTES: dict[str, str] = {
    "seqkd": "Kim & Rush 2016: cross-entropy on teacher-generated text (sampled live; "
    "source.off_policy=dataset trains on stored teacher text, e.g. an opd cache)",
    "supervised_kd": "Hinton et al. / supervised KD: forward KL on fixed prefixes",
    "gkd": "Agarwal et al. 2024: lambda-mixed sources with generalized JSD(beta)",
    "on_policy": "Thinking Machines 2025: student samples, per-token reverse-KL advantage",
    "minillm_like": "Gu et al. 2024 (MiniLLM) without its PPO machinery: full-vocabulary "
    "reverse KL on student samples",
    "opsd": "OPSD (Zhao et al. 2026): the student's own model with the reference in its "
    "prompt (teacher.privileged_template) scores its samples, full-vocabulary JSD",
    "sdft": "SDFT (Shenfeld et al. 2026): self-distillation with privileged context, "
    "per-token reverse KL",
}
