"""patch_model under DeepSpeed ZeRO-3: 2 CPU ranks (gloo) match one process.

ZeRO-3 partitions every parameter and gathers it around the forward of the module that owns
it. The patched forward reads ``lm_head.weight`` (tied to the embedding or not) outside the
head's own forward, so this checks that the fused loss sees the gathered weight and that its
gradient reaches the partitioned parameter: each rank trains on its own micro-batch, and the
losses and the final head weight must equal one process training on the mean of both losses.
Skipped where DeepSpeed is not installed (it is in the dev extra).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

SCRIPT = r"""
import json, os, sys
import torch, transformers
from calibrated_lm import patch_model

tied, mode, out = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
torch.manual_seed(0)
cfg = transformers.LlamaConfig(
    vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    tie_word_embeddings=tied,
)
model = transformers.AutoModelForCausalLM.from_config(cfg)
patch_model(model, label_smoothing=0.1, min_block_rows=0)
g = torch.Generator().manual_seed(1)
batches = [torch.randint(0, 61, (2, 9), generator=g) for _ in range(6)]  # 3 steps x 2 ranks
losses = []
if mode == "ref":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        parts = [model(input_ids=b, labels=b).loss for b in batches[2 * step : 2 * step + 2]]
        loss = (parts[0] + parts[1]) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append([float(p) for p in parts])
    head = model.get_output_embeddings().weight.detach().clone()
    rank = 0
else:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # 0: partition every parameter, however small (the default keeps small ones whole).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weight = model.get_output_embeddings().weight
    assert weight.numel() == 0 or weight.ds_status is not None  # really partitioned
    for step in range(3):
        b = batches[2 * step + rank]
        loss = engine(input_ids=b, labels=b).loss
        engine.backward(loss)
        engine.step()
        both = [torch.zeros(1), torch.zeros(1)]
        torch.distributed.all_gather(both, loss.detach().reshape(1))
        losses.append([float(x) for x in both])
    with deepspeed.zero.GatheredParameters([weight]):
        head = weight.detach().clone()
if rank == 0:
    torch.save(head, out + ".pt")
    with open(out + ".json", "w") as fh:
        json.dump(losses, fh)
if mode == "ds":
    # Without this the gloo group's threads can outlive the interpreter and abort a rank at exit
    # ("terminate called without an active exception"), failing the run after its work is done.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Even so, CI saw one rank abort there (a joinable C++ thread destroyed while Python
    # finalises): once the results are on disk, leave without running finalisers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Multi-process ranks: one xdist worker runs all of them (`--dist loadgroup`), so two rank sets
# never share the two cores at once.
@pytest.mark.xdist_group("ranks")
@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_zero3_two_gloo_ranks_match_one_process(tmp_path: Path, tied: bool) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    flag = "1" if tied else "0"
    ref = subprocess.run(
        [sys.executable, str(script), flag, "ref", str(tmp_path / "ref")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), flag, "ds", str(tmp_path / "ds")]  # fmt: skip
    ds = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert ds.returncode == 0, ds.stderr[-3000:]
    want = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "ds.json").read_text())
    assert got[0] == pytest.approx(want[0], rel=1e-6)  # same start, same batches
    # Later steps go through AdamW, whose update amplifies rounding in near-zero gradients.
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-3)
    head_ref, head_ds = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "ds.pt")
    assert head_ds.shape == head_ref.shape == (61, 16)
    torch.testing.assert_close(head_ds, head_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.xdist_group("ranks")
def test_train_command_under_zero3_matches_one_rank_and_resumes(tmp_path: Path) -> None:
    """`calibrated-lm train --deepspeed` on 2 gloo ranks: the 1-rank run's losses and weights,
    including an epoch's last step (one micro-batch: the second rank runs a weight-0 copy),
    and a run stopped at step 2 and resumed ends like the uninterrupted one."""
    from helpers_tiny_lm import build_tiny_lm
    from helpers_train import RECORDS
    from helpers_train import logged as _logged
    from helpers_train import params as _params

    from calibrated_lm.training.loop import TrainConfig, train

    model_dir = build_tiny_lm(tmp_path / "model", seed=1)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def launch(out: Path, steps: int, *resume: str) -> None:
        # The user's command line, so the run also ends the way the CLI ends a rank.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "calibrated_lm.cli", "train",
               "--model", str(model_dir), "--data", str(data), "--output", str(out),
               "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "64",
               "--max-steps", str(steps), "--lr", "3e-3", "--warmup-ratio", "0.2",
               "--save-every", "2", "--no-progress", "--device", "cpu",
               "--deepspeed", str(config), *resume]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    # 14 records in micro-batches of 2: 7 per epoch, 2 per step, so step 4 has only one.
    launch(tmp_path / "ds", 4)
    one = tmp_path / "one"
    train(TrainConfig(model=str(model_dir), data=str(data), output=str(one), batch_size=2,
                      grad_accum=2, max_seq_len=64, max_steps=4, lr=3e-3, warmup_ratio=0.2,
                      save_every=2, progress=False, device="cpu"))  # fmt: skip
    got, want = _logged(tmp_path / "ds"), _logged(one)
    assert [r["target_tokens"] for r in got] == [r["target_tokens"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4)
    a, b = _params(one / "final"), _params(tmp_path / "ds" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)

    launch(tmp_path / "split", 2)
    assert (tmp_path / "split" / "checkpoints" / "step-000002" / "zero3").is_dir()
    launch(tmp_path / "split", 4, "--resume")
    assert [r["step"] for r in _logged(tmp_path / "split")] == [1, 2, 3, 4]
    c = _params(tmp_path / "split" / "final")
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_deepspeed_configs_are_sentences(tmp_path: Path) -> None:
    from calibrated_lm.errors import UserError
    from calibrated_lm.training.zero3 import engine_config

    def cfg(text: str | None) -> dict:
        path = tmp_path / "ds.json"
        if text is not None:
            path.write_text(text)
        return engine_config(str(path), micro_batch=2, grad_accum=3, world=2, clip=1.0, bf16=False)

    for text, message in [
        ('{"zero_optimization": {"stage": 2}}', "only ZeRO stage 3"),
        ('{"optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"zero_optimization": null}', "'zero_optimization' .* must be a JSON object"),
    ]:
        with pytest.raises(UserError, match=message):
            cfg(text)
    merged = cfg('{"zero_optimization": {"reduce_bucket_size": 1000}}')
    assert merged["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 3}
    assert merged["train_batch_size"] == 12 and merged["gradient_clipping"] == 1.0
    (tmp_path / "ds.json").unlink()
    with pytest.raises(UserError, match="cannot read"):
        cfg(None)
