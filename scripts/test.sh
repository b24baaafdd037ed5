#!/usr/bin/env bash
# The test command (README, CI): set up, lint, run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The official openai client against a real `dflash serve` on the shipped model.
./scripts/test_openai.sh
