#!/usr/bin/env bash
# Claim 3's staging (experiments/claim_stage.sh): the control's base units restored, then every
# claim-3 run with committed evaluations.
#   bash experiments/claim3_stage.sh [OUT_DIR=.carry/c3] [PIECES=auto]
exec bash "$(dirname "$0")/claim_stage.sh" claim3 "$@"
