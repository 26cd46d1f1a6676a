#!/usr/bin/env bash
# Claim 2's staging (kept under this name: the device logs' commands.txt call it):
#   bash experiments/claim2_stage.sh [OUT_DIR=.carry/c2] [PIECES=auto]
exec bash "$(dirname "$0")/claim_stage.sh" claim2 "$@"
