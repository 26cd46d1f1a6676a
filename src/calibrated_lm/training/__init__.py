"""Label-smoothed SFT on the fused loss: data formatting, the loop, checkpoints, FSDP2."""
