"""``calibrated-lm train --head-subset FILE``: the restricted head trained through the CLI, the
share of targets left out logged, the file saved into every model folder, kept on a resume,
and the refusals (another vocabulary, a changed subset on resume, --deepspeed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import run_cli
from helpers_train import Killed, kill_at, logged, params, small_cfg, write_setup

from calibrated_lm.errors import UserError
from calibrated_lm.models import head_subset as hs
from calibrated_lm.training.config_checks import validate_config
from calibrated_lm.training.loop import train


def _tied_copy(model_dir: Path, folder: Path) -> Path:
    """The tiny model with its head tied to the input embedding (as Gemma 3's is)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, model_dir, data = write_setup(tmp_path_factory.mktemp("subset"))
    tied = _tied_copy(model_dir, root / "tied")
    v = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    # Every other token id plus the EOS (the last id): many targets fall outside.
    subset = hs.HeadSubset(np.unique(np.r_[np.arange(0, v, 2), v - 1]), v)
    hs.save(subset, root, rule="test: even ids")
    full = root / "full"
    full.mkdir()
    hs.save(hs.HeadSubset(np.arange(v), v), full)
    return root, model_dir, data, tied, root / hs.FILE, full / hs.FILE, subset


def _argv(setup, out: str, *extra: str) -> list[str]:
    root, _, data, tied, subset_file, _, _ = setup
    return [
        "train", "--model", str(tied), "--data", str(data), "--output", str(root / out),
        "--batch-size", "2", "--grad-accum", "2", "--max-seq-len", "64", "--max-steps", "4",
        "--lr", "3e-3", "--warmup-ratio", "0.2", "--save-every", "2", "--device", "cpu",
        "--no-progress", "--head-subset", str(subset_file), *extra,
    ]  # fmt: skip


def test_cli_trains_the_kept_rows_logs_the_share_and_saves_the_file(setup):
    root, _, _, tied, subset_file, _, subset = setup
    code, err = run_cli(_argv(setup, "cli"))
    assert code == 0, err
    out = root / "cli"
    rows = logged(out)
    assert len(rows) == 4
    for r in rows:
        assert r["outside_subset_tokens"] > 0 and 0 < r["outside_subset_share"] < 1
        total = r["target_tokens"] + r["outside_subset_tokens"]
        assert r["outside_subset_share"] == pytest.approx(r["outside_subset_tokens"] / total)
    # The file, byte for byte, beside config.json in every checkpoint and final/.
    folders = [out / "final", *sorted((out / "checkpoints").glob("step-*"))]
    assert len(folders) == 3
    for folder in folders:
        assert (folder / hs.FILE).read_bytes() == subset_file.read_bytes()
    state = json.loads((folders[-1] / "state.json").read_text())
    assert state["head_subset"]["size"] == subset.size
    assert state["head_subset"]["sha256"] == hs.open_file(subset_file).sha256
    # Still tied (as a run without a subset); every kept row moved (the head's gradient), and
    # rows outside the subset moved only where the inputs hold their token.
    config = json.loads((out / "final" / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is True
    before, after = params(tied), params(out / "final")
    outside = torch.as_tensor(subset.index_map()) < 0
    w0, w1 = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    if "lm_head.weight" in after:
        torch.testing.assert_close(after["lm_head.weight"], w1, rtol=0, atol=0)
    assert (w1[~outside] - w0[~outside]).abs().amax(dim=1).gt(0).all()
    from transformers import AutoTokenizer

    from calibrated_lm.training.data import load_dataset

    seen = torch.zeros(outside.numel(), dtype=torch.bool)
    tok = AutoTokenizer.from_pretrained(str(tied))
    for ex in load_dataset(setup[2], tok, max_seq_len=64).examples:
        seen[torch.as_tensor(ex.input_ids)] = True
    never = outside & ~seen
    assert never.any()
    torch.testing.assert_close(w1[never], w0[never], rtol=0, atol=0)


def test_a_subset_of_every_token_trains_as_the_full_head(setup):
    """On an untied head, V' = V changes nothing: same losses, same denominators."""
    root, model_dir, data, _, _, full_file, _ = setup
    plain = train(small_cfg(root, model_dir, data, "plain", save_every=0))
    full = train(small_cfg(root, model_dir, data, "full", save_every=0, head_subset=str(full_file)))
    a, b = logged(root / "plain"), logged(root / "full")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert [r["target_tokens"] for r in a] == [r["target_tokens"] for r in b]
    assert all(r["outside_subset_tokens"] == 0 for r in b)
    assert plain["outside_subset_share"] is None and full["outside_subset_share"] == 0.0


def test_resume_keeps_the_subset_and_ends_like_an_uninterrupted_run(setup):
    root, _, data, tied, subset_file, full_file, _ = setup
    assert run_cli(_argv(setup, "whole"))[0] == 0
    cfg = small_cfg(root, tied, data, "killed", head_subset=str(subset_file))
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at(3))  # checkpoint 2 is kept, step 3 lost
    argv = _argv(setup, "killed", "--resume")
    del argv[argv.index("--head-subset") : argv.index("--head-subset") + 2]  # kept anyway
    code, err = run_cli(argv)
    assert code == 0, err
    assert "training on with the checkpoint's head subset" in err
    a, b = logged(root / "whole"), logged(root / "killed")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert (root / "killed" / "final" / hs.FILE).read_bytes() == subset_file.read_bytes()
    newest = sorted((root / "killed" / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "state.json").read_text())
    assert state["config"]["head_subset"] == str(subset_file)
    # Another subset on resume: refused, naming the checkpoint.
    argv = _argv(setup, "killed", "--resume", "--max-steps", "6")
    argv[argv.index("--head-subset") + 1] = str(full_file)
    code, err = run_cli(argv)
    assert code == 2 and "is not the subset the run checkpointed in step-000004" in err


def test_a_subset_given_to_a_run_trained_without_one_is_refused_on_resume(setup):
    root, model_dir, data, _, subset_file, _, _ = setup
    cfg = small_cfg(root, model_dir, data, "nosubset")
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at(3))
    with pytest.raises(UserError, match="trained the full output head, so --head-subset"):
        train(replace(cfg, resume=True, head_subset=str(subset_file)))


def test_refusals_name_the_option(setup, tmp_path):
    root, model_dir, data, _, subset_file, _, _ = setup
    other = tmp_path / "other"
    other.mkdir()
    hs.save(hs.HeadSubset(np.arange(5), 1000), other)
    with pytest.raises(UserError, match="vocabulary of 1000 tokens, but the model's output head"):
        train(small_cfg(root, model_dir, data, "wrongv", head_subset=str(other)))
    with pytest.raises(UserError, match="--head-subset .*cannot read the head subset"):
        train(small_cfg(root, model_dir, data, "missing", head_subset=str(tmp_path / "no.json")))
    (tmp_path / "bad.json").write_text('{"kept": [3, 1], "vocab_size": 5}')
    with pytest.raises(UserError, match="--head-subset .*bad.json: not a valid head subset"):
        train(small_cfg(root, model_dir, data, "bad", head_subset=str(tmp_path / "bad.json")))
    cfg = small_cfg(root, model_dir, data, "ds", head_subset=str(subset_file))
    with pytest.raises(UserError, match="--head-subset does not work with --deepspeed"):
        validate_config(replace(cfg, deepspeed="ds.json"))
    with pytest.raises(UserError, match="--head-subset must be a non-empty path"):
        validate_config(replace(cfg, head_subset=""))
    # A folder holding head_subset.json is accepted as the file.
    assert hs.open_file(subset_file.parent).sha256 == hs.open_file(subset_file).sha256
