#!/usr/bin/env bash
# Install opd into .venv (CPU PyTorch) and run the main job: `opd demo [args]`.
source "$(dirname "$0")/_env.sh" demo
exec .venv/bin/opd demo "$@"
