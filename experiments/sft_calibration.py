"""Experiment (issue 6): does SFT hurt calibration, and does label smoothing keep it?

Claims tested, on the embedded ``gemma-3-270m`` base (V = 262,144, D = 640):

1. SFT degrades calibration relative to the base model;
2. label smoothing (eps 0.1, 0.2) during SFT keeps calibration without costing accuracy;
3. for a large-vocabulary / small-hidden model, training-time temperature (T = 0.5) or logit
   softcapping (C = 32) recovers some of the benefit.

The experiment is a list of *units*, run in priority order: evaluate the base model, (full
profile) pick the learning rate on a held-out slice, then for every SFT setting train it and
evaluate it, and finally evaluate the off-the-shelf instruct reference ``smollm2-135m-instruct``.
Every unit writes its own folder under ``--work`` and a ``done.json`` marker, so a rerun skips
finished units (and an interrupted evaluation resumes from its samples journal).
``--time-limit S`` stops before a unit that would not end within S seconds (estimates come from
the units already timed, else the profile's defaults), so the grid runs in chunks of < 10 min.
``--no-new-training`` (a device session's last chunk) begins no training unit without a
checkpoint: begun ones resume, evaluations run, and the chunk ends when nothing else can.

Each unit is exactly a ``calibrated-lm train`` / ``calibrated-lm eval`` command, called
in-process (one Python start, one CUDA context per chunk); the equivalent command line is
written to ``command.txt`` in the unit's folder.

Profiles:

* ``full``: the issue's protocol: lr in {5e-6, 2e-5, 8e-5} picked by held-out NLL of eps = 0
  runs (seed 1), eps in {0, 0.1, 0.2} x seeds {1, 2}, T = 0.5 and C = 32 with eps in {0, 0.1} x
  seeds {1, 2}; 2 epochs, max length 2048; MMLU test, ARC-Easy test, HellaSwag validation.
* ``budget``: the reduced grid: lr fixed at 2e-5 (the paper's middle value, no selection),
  eps {0, 0.1} x seeds {1, 2}, eps 0.2 (seed 1), T = 0.5 and C = 32 with eps {0, 0.1}
  (seed 1); 2 epochs, max length 1024; same evaluation as ``full``. ``--plan`` estimates its
  GPU time from the units already timed.
* ``smoke``: CPU check of the whole pipeline: smollm2-135m-instruct as the "base", 3 steps,
  2 questions per task (per subject for MMLU).

Subcommands::

    python experiments/sft_calibration.py run --profile budget --data A.json B.json ... \\
        [--work runs/sft_calibration] [--time-limit 480] [--plan]
    python experiments/sft_calibration.py bundle --work DIR --out results.tar.gz
    python experiments/sft_calibration.py unbundle results.tar.gz --work DIR
    python experiments/sft_calibration.py report --work DIR [--results DIR]

``report`` (CPU, seconds) runs ``calibrated-lm compare`` over the evaluations and writes the
tables, overlaid reliability diagrams and training curves to ``--results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Clock,
    bundle,
    mix_instruction_data,
    read_json,
    unbundle,
    write_json,
)
from restore_units import RESTORED  # noqa: E402

from calibrated_lm.training.stop import TrainingStopped  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / "runs" / "sft_calibration"
DEFAULT_RESULTS = ROOT / "experiments" / "results" / "sft_calibration"
DONE = "done.json"
TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class SFTRun:
    """One SFT setting: label smoothing eps, optional training temperature/softcap, seed."""

    eps: float
    seed: int
    lr: float | None = None  # None: the selected learning rate
    temperature: float | None = None
    softcap: float | None = None
    epochs: float | None = None  # None: the profile's
    # Claim 3: the softmax restricted to this many tokens (CLAIM3_SUBSETS), None: all V.
    vocab: int | None = None

    def name(self, lr: float | None) -> str:
        """Folder name, e.g. ``sft_lr2e-05_eps0.1_T0.5_s1`` (``lr?`` before selection), with
        ``_ep3`` after the lr when the run sets its own number of epochs."""
        parts = ["sft_lr?" if lr is None else f"sft_lr{lr:g}"]
        if self.epochs is not None:
            parts.append(f"ep{self.epochs:g}")
        parts.append(f"eps{self.eps:g}")
        if self.temperature is not None:
            parts.append(f"T{self.temperature:g}")
        if self.softcap is not None:
            parts.append(f"C{self.softcap:g}")
        if self.vocab is not None:
            parts.append(f"V{self.vocab}")
        parts.append(f"s{self.seed}")
        return "_".join(parts)

    def setting(self) -> str:
        """Seed-free label used to group seeds in tables."""
        s = "SFT" if self.eps == 0 else f"SFT+LS {self.eps:g}"
        if self.lr is not None and self.epochs is not None:
            s += f" (lr {self.lr:g}, {self.epochs:g} ep)"
        if self.temperature is not None:
            s += f", T={self.temperature:g}"
        if self.softcap is not None:
            s += f", C={self.softcap:g}"
        if self.vocab is not None:
            s += f", V'={self.vocab}"
        return s


@dataclass(frozen=True)
class Profile:
    base: str
    reference: str | None
    lrs: tuple[float, ...]
    runs: tuple[SFTRun, ...]  # in priority order
    epochs: float
    max_steps: int | None
    max_seq_len: int
    batch_size: int
    grad_accum: int
    holdout_frac: float
    tasks: str
    limit: int | None
    fit_split: bool
    bootstrap: int
    eval_batch: str
    # Seconds per unit before any unit of this kind was timed (see ESTIMATES in the docs).
    est: dict[str, float] = field(default_factory=dict)
    # Scoring formats -> tasks. "plain": the harness prompt; "trained": every model, the base
    # included, through the chat template the SFT runs were trained on. Empty: plain, ``tasks``.
    formats: dict[str, str] = field(default_factory=dict)
    # Held-out statistics per example (paired bootstrap over examples) instead of pooled.
    heldout_per_example: bool = False
    # Examples per decoder forward of the per-example held-out pass. 1 (one forward per
    # example) is the method of the control and claim 2, kept so that their pairs compare like
    # with like; claim 3 (whose report reads no held-out file) batches: 16x fewer forwards
    # (the speed-up on the GPU is not measured yet).
    heldout_batch: int = 1
    # Checkpoint every N steps (0: none). With checkpoints a training unit may start although
    # it will not end within the chunk: the chunk's timeout stops it, the next one resumes.
    save_every: int = 0
    # V' of the head subsets (CLAIM3_SUBSETS) under which the base is scored too.
    base_subsets: tuple[int, ...] = ()
    # Claim 3: a run trained with a temperature T or softcap C is scored a second time in the
    # trained format with them applied (format "trained_applied", eval --logit-temperature T /
    # --logit-softcap C), beside "as saved".
    score_applied: bool = False

    def eval_formats(self) -> dict[str, str]:
        return self.formats or {"plain": self.tasks}


_MAIN_FULL = tuple(SFTRun(e, s) for s in (1, 2) for e in (0.0, 0.1, 0.2))
_REMEDY_FULL = tuple(
    SFTRun(e, s, temperature=t, softcap=c)
    for s in (1, 2)
    for e in (0.0, 0.1)
    for t, c in ((0.5, None), (None, 32.0))
)
# In priority order: claims 1-2 with two seeds first, then eps 0.2, then the remedies.
_BUDGET_RUNS = (
    SFTRun(0.0, 1),
    SFTRun(0.1, 1),
    SFTRun(0.0, 2),
    SFTRun(0.1, 2),
    SFTRun(0.2, 1),
    SFTRun(0.1, 1, temperature=0.5),
    SFTRun(0.1, 1, softcap=32.0),
    SFTRun(0.0, 1, temperature=0.5),
    SFTRun(0.0, 1, softcap=32.0),
)

# Seconds per unit on one H100 before any unit of a run was timed. Pre-run guesses were 45 s per
# budget SFT run and 50 s per evaluation (from token counts: ~3.7 M tokens scored per evaluation,
# ~2.2 M padded tokens per epoch); measured on the H100 (docs/results.md): the base evaluation
# scored its 28,561 questions in 97 s (295 questions/s) plus ~100 s of per-subject bootstrap
# summaries (now skipped on the device: bootstrap=0, the report recomputes every CI), and SFT ran
# at 3.3-3.7 s per step of ~40 k target tokens (~13 k input tokens/s), ~160 s for 44 steps.
# ``bootstrap`` is the evaluation's own summary.json bootstrap; the report's CIs use 1000 draws.
_FULL = Profile(
    base="gemma-3-270m",
    reference="smollm2-135m-instruct",
    lrs=(5e-6, 2e-5, 8e-5),
    runs=_MAIN_FULL + _REMEDY_FULL,
    epochs=2.0,
    max_steps=None,
    max_seq_len=2048,
    batch_size=8,
    grad_accum=16,
    holdout_frac=0.05,
    tasks="mmlu,arc_easy,hellaswag",
    limit=None,
    fit_split=True,
    bootstrap=0,
    eval_batch="auto",
    est={"prepare": 15, "train": 330, "eval": 120, "eval_ref": 90, "select": 1},
)
# The budget grid differs from the full one only in these fields.
_BUDGET = dataclasses.replace(
    _FULL,
    lrs=(2e-5,),
    runs=_BUDGET_RUNS,
    max_seq_len=1024,
    est={"prepare": 15, "train": 180, "eval": 120, "eval_ref": 90, "select": 1},
)
# Issue 12's positive control: can SFT make gemma-3-270m over-confident at all? eps = 0 only,
# a dose-response over lr and epochs on Natural Instructions (22,457 short-answer examples)
# plus the three earlier instruction files (docs/results.md pre-registers the criterion).
# The high lr first, its short run before its long one, so a session cut short still has a
# point of the dose-response at the dose most likely to move the model.
PRIMARY_TASKS = "arc_easy,arc_challenge,piqa,sciq,openbookqa"
SECONDARY_TASKS = "mmlu,hellaswag"
_CONTROL_RUNS = (
    SFTRun(0.0, 1, lr=8e-5, epochs=1),
    SFTRun(0.0, 1, lr=8e-5, epochs=3),
    SFTRun(0.0, 1, lr=2e-5, epochs=1),
    SFTRun(0.0, 1, lr=2e-5, epochs=3),
)
_CONTROL = dataclasses.replace(
    _FULL,
    reference=None,
    lrs=(2e-5,),  # no selection: every run names its own lr
    runs=_CONTROL_RUNS,
    epochs=3.0,
    # 1024 keeps 99% of the Natural Instructions examples whole (LIMA loses its long tails);
    # 32 x 4 = the same 128 examples per step as before, in fewer, fuller forwards.
    max_seq_len=1024,
    batch_size=32,
    grad_accum=4,
    tasks=f"{PRIMARY_TASKS},{SECONDARY_TASKS}",
    fit_split=False,
    formats={"trained": f"{PRIMARY_TASKS},{SECONDARY_TASKS}", "plain": PRIMARY_TASKS},
    heldout_per_example=True,
    save_every=60,
    est={"prepare": 60, "train": 400, "eval": 150, "heldout": 40, "select": 1},
)
# Issue 12's claim 2 at the control's setting (docs/issue12_plan.md pre-registers the test):
# eps {0, 0.05, 0.1, 0.2} x seeds {1, 2, 3}, seed by seed so that each session ends with whole
# eps sweeps. eps 0 seed 1 is the control's run: restore its finished units into the work
# folder (done markers and results travel; weights do not) instead of training it again.
CLAIM2_EPS = (0.0, 0.05, 0.1, 0.2)
CLAIM2_SEEDS = (1, 2, 3)
_CLAIM2 = dataclasses.replace(
    _CONTROL,
    runs=tuple(SFTRun(e, s, lr=8e-5, epochs=3) for s in CLAIM2_SEEDS for e in CLAIM2_EPS),
)
# Issue 12's claim 3 (docs/issue12_plan.md, step 5 as amended): the claim-2 setting with the
# softmax restricted to V' tokens (experiments/claim3_subsets.py built the committed subsets),
# V' = 262,144 being claim 2's own runs (restored, not trained again). The primary test's
# runs first (V' 24,576, two seeds), then V' 65,536, then the remedies at full V. The base is
# scored under each restriction too (its D(V') baseline, and the regime check's reference).
# The scoring format of a remedy run with its training T / C applied (claim3_report reads it).
APPLIED = "trained_applied"
CLAIM3_SUBSETS = {
    v: ROOT / "experiments" / "results" / "claim3_subsets" / f"V{v}" / "head_subset.json"
    for v in (65536, 24576)
}
_C3 = {"lr": 8e-5, "epochs": 3}
_CLAIM3_RUNS = (
    *(SFTRun(e, s, vocab=24576, **_C3) for s in (1, 2) for e in (0.0, 0.1)),
    *(SFTRun(e, s, vocab=65536, **_C3) for s in (1, 2) for e in (0.0, 0.1)),
    *(
        SFTRun(e, s, temperature=t, softcap=c, **_C3)
        for t, c in ((0.5, None), (None, 32.0))
        for s in (1, 2)
        for e in (0.0, 0.1)
    ),
)
_CLAIM3 = dataclasses.replace(
    _CONTROL,
    runs=_CLAIM3_RUNS,
    base_subsets=tuple(sorted(CLAIM3_SUBSETS, reverse=True)),
    score_applied=True,
    heldout_batch=16,
    # A whole run with two workers on the GPU: 564 steps at ~1.55 s (session 14's device
    # logs) plus the final save and held-out pass. A begun run is estimated from its own
    # log instead (_resume_estimate).
    # Alone on the GPU (one worker, session 22 on an H100): 553 steps in a 528 s call, then
    # 70.5 s for the last 11 steps, the final save and the held-out pass.
    est=_CONTROL.est | {"train": 1000, "train_alone": 600},
    # Each periodic checkpoint stopped the step clock ~9 s (session 14's logs, steps 60, 420,
    # 480), 8 of them a run. A chunk's end checkpoints the step it is in (SIGTERM), and
    # checkpoints never outlive the machine, so the periodic ones only guard against a
    # worker's crash within a chunk: a third of the run is enough for that. A resume goes on
    # with the same optimizer, schedule, RNG and data position (exact on the CPU, as the
    # training tests check), so where a run was saved does not enter its results.
    save_every=188,
)
PROFILES: dict[str, Profile] = {
    "full": _FULL,
    "budget": _BUDGET,
    "control": _CONTROL,
    "claim2": _CLAIM2,
    "claim3": _CLAIM3,
    # CPU check of the control's pipeline (both formats, per-example held-out statistics,
    # checkpointed training): no evidence in its numbers.
    "control_smoke": dataclasses.replace(
        _CONTROL,
        base="smollm2-135m-instruct",
        runs=(SFTRun(0.0, 1, lr=8e-5, epochs=2), SFTRun(0.0, 1, lr=2e-5, epochs=1)),
        max_steps=3,
        max_seq_len=128,
        batch_size=2,
        grad_accum=1,
        holdout_frac=0.01,
        limit=2,
        save_every=2,
        est={"prepare": 10, "train": 30, "eval": 60, "heldout": 10, "select": 1},
    ),
    # CPU check of claim 3's pipeline on the real base (the subsets are gemma's): a restricted
    # head trained and scored with --uncovered skip, a remedy run scored as saved and applied.
    "claim3_smoke": dataclasses.replace(
        _CLAIM3,
        runs=(
            SFTRun(0.1, 1, vocab=24576, lr=8e-5, epochs=1),
            SFTRun(0.0, 1, temperature=0.5, lr=8e-5, epochs=1),
        ),
        base_subsets=(24576,),
        # One primary task and HellaSwag (the task the subset leaves questions out of).
        tasks="arc_easy,hellaswag",
        formats={"trained": "arc_easy,hellaswag"},
        max_steps=2,
        max_seq_len=128,
        batch_size=2,
        grad_accum=1,
        holdout_frac=0.01,
        limit=12,  # a HellaSwag question in five survives the 24,576 subset
        save_every=0,
        est={"prepare": 60, "train": 120, "eval": 120, "heldout": 30, "select": 1},
    ),
    "smoke": Profile(
        base="smollm2-135m-instruct",
        reference=None,
        lrs=(2e-5, 8e-5),
        runs=(SFTRun(0.0, 1), SFTRun(0.1, 1), SFTRun(0.1, 1, temperature=0.5)),
        epochs=2.0,
        max_steps=3,
        max_seq_len=128,
        batch_size=2,
        grad_accum=1,
        holdout_frac=0.01,
        tasks="mmlu,arc_easy,hellaswag",
        limit=2,
        fit_split=False,
        bootstrap=200,
        eval_batch="auto",
        est={"prepare": 10, "train": 30, "eval": 60, "eval_ref": 30, "select": 1},
    ),
}


# --------------------------------------------------------------------------------------------
# Units


@dataclass
class Unit:
    """One resumable piece of work: ``folder/done.json`` marks it finished."""

    name: str
    kind: str  # prepare | train | select | eval | eval_ref
    folder: Path
    action: Callable[[], dict[str, Any]]
    needs: tuple[str, ...] = ()

    def done(self) -> bool:
        return (self.folder / DONE).exists()


class Experiment:
    """The unit list of one profile over one work folder."""

    def __init__(
        self, profile: Profile, work: Path, data: list[Path], device: str, compile: bool = False
    ) -> None:
        self.p = profile
        self.work = work
        self.data = data
        self.device = device
        # An implementation switch (models/compile.py), not part of the protocol: recorded in
        # each training unit's command.txt.
        self.compile = compile
        # Whether other workers share this GPU (run --gpu-memory-fraction below 1): a training
        # chunk's fixed costs (load, final save, held-out pass) differ about 3x between the two
        # (_past_timings), so each is estimated from runs made the same way.
        self.shared_gpu = False

    # -- learning rate ------------------------------------------------------------------------
    def selected_lr(self) -> float | None:
        if len(self.p.lrs) == 1:
            return self.p.lrs[0]
        path = self.work / "select_lr" / DONE
        return read_json(path)["lr"] if path.exists() else None

    def units(self) -> list[Unit]:
        p, w = self.p, self.work
        units = [Unit("prepare", "prepare", w / "data", self._prepare)]
        units += self._eval_units("base", p.base, ("prepare",))  # held-out stats need data
        for v in p.base_subsets:
            units += self._eval_units(f"base_V{v}", p.base, ("prepare",), subset=v)
        if p.heldout_per_example:
            units.append(
                Unit(
                    "heldout/base",
                    "heldout",
                    w / "heldout_base",
                    lambda: self._heldout(p.base, w / "heldout_base"),
                    needs=("prepare",),
                )
            )
        lr_sel = len(p.lrs) > 1
        if lr_sel:
            names = []
            for lr in p.lrs:
                run = SFTRun(0.0, 1, lr=lr)
                names.append(f"train/{run.name(lr)}")
                units.append(self._train_unit(run, lr))
            units.append(
                Unit("select_lr", "select", w / "select_lr", self._select, needs=tuple(names))
            )
        lr = self.selected_lr()
        for run in p.runs:
            if lr is None:  # not selected yet: placeholders so --plan can count them
                plain = run.temperature is None and run.softcap is None
                if not (plain and run.eps == 0.0 and run.seed == 1):  # reuses a selection run
                    units.append(Unit(f"train/{run.name(None)}", "train", w / "pending", _never))
                units.append(Unit(f"eval/{run.name(None)}", "eval", w / "pending", _never))
                continue
            run_lr = run.lr if run.lr is not None else lr
            name = run.name(run_lr)
            t = self._train_unit(run, run_lr)
            if all(u.name != t.name for u in units):
                units.append(t)
            evals = self._eval_units(
                name, str(w / "runs" / name / "final"), (t.name,), restricted=run.vocab, run=run
            )
            if (t.folder / RESTORED).exists() and not (t.folder / "final").is_dir():
                # Restored from committed results (restore_units.py): its weights are gone, so
                # an evaluation not restored with it can never run; it is left out here and
                # the report names the missing format.
                evals = [u for u in evals if u.done()]
            units += evals
        if p.reference:
            # needs prepare: the model is converted there
            units += self._eval_units("reference", p.reference, ("prepare",))
        return units

    def _eval_units(
        self,
        name: str,
        model: str,
        needs: tuple[str, ...],
        subset: int | None = None,
        restricted: int | None = None,
        run: SFTRun | None = None,
    ) -> list[Unit]:
        """One evaluation unit per scoring format (one folder ``evals/<name>`` when the
        profile has only the plain format, ``evals/<name>__<format>`` otherwise). ``subset``:
        score under that head subset; ``restricted``: the V' of the subset the model folder
        carries itself (a run trained with --head-subset). Either way questions the subset
        cannot score are left out and counted (``--uncovered skip``: HellaSwag's; the
        required tokens keep every primary and MMLU question). With the profile's
        ``score_applied``, a ``run`` trained with T or C gets a ``trained_applied`` unit too."""
        formats = dict(self.p.eval_formats())
        applied = run is not None and (run.temperature is not None or run.softcap is not None)
        if self.p.score_applied and applied:
            formats[APPLIED] = formats["trained"]
        skip = subset is not None or restricted is not None
        units = []
        for fmt, tasks in formats.items():
            single = list(formats) == ["plain"]
            folder = name if single else f"{name}__{fmt}"
            transform = (run.softcap, run.temperature) if fmt == APPLIED and run else None
            units.append(
                Unit(
                    f"eval/{name}" if single else f"eval/{name}/{fmt}",
                    "eval_ref" if name == "reference" else "eval",
                    self.work / "evals" / folder,
                    lambda n=name, m=model, f=folder, fm=fmt, t=tasks, tr=transform: self._eval(
                        n, m, f, fm, t, subset, skip, tr
                    ),
                    needs=needs,
                )
            )
        return units

    def _train_unit(self, run: SFTRun, lr: float) -> Unit:
        name = run.name(lr)
        return Unit(
            f"train/{name}",
            "train",
            self.work / "runs" / name,
            lambda: self._train(run, lr),
            needs=("prepare",),
        )

    # -- actions ------------------------------------------------------------------------------
    def _prepare(self) -> dict[str, Any]:
        if not self.data:
            raise SystemExit("error: --data FILE... is required to prepare the SFT data")
        for f in self.data:
            if not f.exists():
                raise SystemExit(f"error: data file {f} does not exist")
        info = mix_instruction_data(
            self.data, self.work / "data", holdout_frac=self.p.holdout_frac, seed=0
        )
        from calibrated_lm.training.data import PLAIN_CHAT_TEMPLATE

        # The format the SFT runs train in (the base has no chat template): "trained" scoring
        # renders every model's prompts with it.
        (self.work / "data" / TEMPLATE_FILE).write_text(PLAIN_CHAT_TEMPLATE, encoding="utf-8")
        # Convert the GGUF models once now, so later units' timings exclude the conversion.
        from calibrated_lm.models.loading import convert_gguf, resolve_model

        # A reference evaluation restored from an earlier run needs no model here.
        ref_done = (self.work / "evals" / "reference" / DONE).exists()
        for m in (self.p.base, None if ref_done else self.p.reference):
            if m:
                resolved = resolve_model(m)
                if isinstance(resolved, Path) and resolved.suffix == ".gguf":
                    convert_gguf(resolved)
        return info

    def _train(self, run: SFTRun, lr: float) -> dict[str, Any]:
        from calibrated_lm.training.loop import TrainConfig, train

        out = self.work / "runs" / run.name(lr)
        p = self.p
        cfg = TrainConfig(
            model=p.base,
            data=str(self.work / "data" / "train.json"),
            output=str(out),
            label_smoothing=run.eps,
            epochs=run.epochs if run.epochs is not None else p.epochs,
            lr=lr,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            max_seq_len=p.max_seq_len,
            max_steps=p.max_steps,
            temperature=run.temperature,
            softcap=run.softcap,
            seed=run.seed,
            device=self.device,
            # save_every 0 (a budget run lasts under a minute): a run killed midway restarts;
            # one killed after its final checkpoint only re-saves final/.
            resume=(out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()),
            save_every=p.save_every,
            keep_checkpoints=1,
            progress=True,
            compile=self.compile,
            head_subset=str(CLAIM3_SUBSETS[run.vocab]) if run.vocab is not None else None,
            # Every run and chunk tokenizes the same train.json with the same tokenizer: once.
            token_cache=str(self.work / "token_cache"),
        )
        _write_command(out, _train_cli(cfg))
        if not cfg.resume:
            # Not done, nothing to resume: a final/ here is from an attempt stopped after its
            # checkpoints were removed and before done.json; train() refuses to overwrite a
            # finished model, and this unit trains it again (as before that refusal).
            shutil.rmtree(out / "final", ignore_errors=True)
        start_step = _checkpoint_step(out) or 0
        t0 = time.monotonic()
        result = train(cfg)
        train_s = time.monotonic() - t0
        _copy_base_tokenizer(p.base, out / "final")
        from calibrated_lm.training.data import PLAIN_CHAT_TEMPLATE

        if result.get("template") == "plain":
            # The base tokenizer (copied back) has no chat template: keep the one train saved.
            (out / "final" / TEMPLATE_FILE).write_text(PLAIN_CHAT_TEMPLATE, encoding="utf-8")
        held = heldout_stats(
            str(out / "final"),
            self.work / "data" / "heldout.json",
            p.max_seq_len,
            self.device,
            per_example=p.heldout_per_example,
            batch=p.heldout_batch,
        )
        write_json(out / "heldout.json", held)
        # The optimizer state is only needed to resume; the evaluation reads final/. Removed
        # last, so a unit stopped before this point resumes instead of starting over.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return {
            "train_s": round(train_s, 1),
            # This chunk's time outside its optimizer steps: what _resume_estimate adds to the
            # steps left of a begun run.
            "overhead_s": round(time.monotonic() - t0 - _step_seconds(out, start_step), 1),
            "shared_gpu": self.shared_gpu,
            "steps": result["steps"],
            "last": result["last"],
            "heldout": {k: v for k, v in held.items() if k != "per_example"},
            "epochs": cfg.epochs,
            "setting": run.setting(),
            "eps": run.eps,
            "seed": run.seed,
            "lr": lr,
            "temperature": run.temperature,
            "softcap": run.softcap,
        }

    def _select(self) -> dict[str, Any]:
        scores = {}
        for lr in self.p.lrs:
            d = self.work / "runs" / SFTRun(0.0, 1, lr=lr).name(lr)
            scores[f"{lr:g}"] = read_json(d / "heldout.json")["nll"]
        best = min(self.p.lrs, key=lambda lr: scores[f"{lr:g}"])
        return {"lr": best, "heldout_nll": scores, "rule": "lowest held-out NLL, eps=0, seed 1"}

    def _heldout(self, model: str, out: Path) -> dict[str, Any]:
        held = heldout_stats(
            model,
            self.work / "data" / "heldout.json",
            self.p.max_seq_len,
            self.device,
            per_example=self.p.heldout_per_example,
            batch=self.p.heldout_batch,
        )
        write_json(out / "heldout.json", held)
        return {"model": model, "heldout": {k: v for k, v in held.items() if k != "per_example"}}

    def _eval(
        self,
        name: str,
        model: str,
        folder: str | None = None,
        fmt: str = "plain",
        tasks: str | None = None,
        subset: int | None = None,
        skip_uncovered: bool = False,
        transform: tuple[float | None, float | None] | None = None,
    ) -> dict[str, Any]:
        """``transform``: (softcap C, temperature T) applied to the logits at scoring time."""
        from calibrated_lm.evaluation.runner import EvalConfig, run_eval

        out = self.work / "evals" / (folder or name)
        p = self.p
        cfg = EvalConfig(
            model=model,
            tasks=[tasks or p.tasks],
            output=out,
            limit=p.limit,
            num_fewshot=0,
            chat_template="off" if fmt == "plain" else str(self.work / "data" / TEMPLATE_FILE),
            normalization="none",
            bootstrap=p.bootstrap,
            batch_size=p.eval_batch,
            device=self.device,
            fit_split=p.fit_split,
            head_subset=str(CLAIM3_SUBSETS[subset]) if subset is not None else None,
            uncovered="skip" if skip_uncovered else "error",
            logit_softcap=transform[0] if transform else None,
            logit_temperature=transform[1] if transform else None,
        )
        _write_command(out, _eval_cli(cfg))
        t0 = time.monotonic()
        summary = run_eval(cfg)
        info: dict[str, Any] = {"eval_s": round(time.monotonic() - t0, 1), "model": model}
        info["timing"] = summary["protocol"]["timing"]
        info["format"] = fmt
        if name == "base" and not p.heldout_per_example:
            info["heldout"] = heldout_stats(
                model, self.work / "data" / "heldout.json", p.max_seq_len, self.device
            )
            write_json(out / "heldout.json", info["heldout"])
        return info


def _copy_base_tokenizer(base: str, final: Path) -> None:
    """Give final/ the base model's tokenizer files: SFT does not change the tokenizer, and
    transformers 5.17 (the GPU machine's) can write a broken tokenizer.json on save."""
    from calibrated_lm.models.loading import convert_gguf, resolve_model

    src = resolve_model(base)
    if isinstance(src, Path) and src.suffix == ".gguf":
        src = convert_gguf(src)
    if not isinstance(src, Path):
        return
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens_map")):
            shutil.copy2(f, final / f.name)


def _never() -> dict[str, Any]:
    raise RuntimeError("unit waits for the learning-rate selection")


def _write_command(folder: Path, command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "command.txt").write_text(command + "\n", encoding="utf-8")


def _train_cli(cfg: Any) -> str:
    parts = [
        "calibrated-lm train",
        f"--model {cfg.model}",
        f"--data {cfg.data}",
        f"--output {cfg.output}",
        f"--label-smoothing {cfg.label_smoothing:g}",
        f"--epochs {cfg.epochs:g}",
        f"--lr {cfg.lr:g}",
        f"--batch-size {cfg.batch_size}",
        f"--grad-accum {cfg.grad_accum}",
        f"--max-seq-len {cfg.max_seq_len}",
        f"--seed {cfg.seed}",
        f"--save-every {cfg.save_every}",
    ]
    if cfg.max_steps is not None:
        parts.append(f"--max-steps {cfg.max_steps}")
    if cfg.temperature is not None:
        parts.append(f"--temperature {cfg.temperature:g}")
    if cfg.softcap is not None:
        parts.append(f"--softcap {cfg.softcap:g}")
    if cfg.compile:
        parts.append("--compile")
    if cfg.head_subset:
        parts.append(f"--head-subset {cfg.head_subset}")
    return " ".join(parts)


def _eval_cli(cfg: Any) -> str:
    parts = [
        "calibrated-lm eval",
        f"--model {cfg.model}",
        f"--tasks {','.join(cfg.tasks)}",
        f"--output {cfg.output}",
        f"--num-fewshot {cfg.num_fewshot}",
        f"--chat-template {cfg.chat_template}",
        f"--normalization {cfg.normalization}",
        f"--bootstrap {cfg.bootstrap}",
        f"--batch-size {cfg.batch_size}",
    ]
    if cfg.limit is not None:
        parts.append(f"--limit {cfg.limit}")
    if cfg.fit_split:
        parts.append("--fit-split")
    if cfg.head_subset:
        parts.append(f"--head-subset {cfg.head_subset}")
    if cfg.uncovered != "error":
        parts.append(f"--uncovered {cfg.uncovered}")
    if cfg.logit_softcap is not None:
        parts.append(f"--logit-softcap {cfg.logit_softcap:g}")
    if cfg.logit_temperature is not None:
        parts.append(f"--logit-temperature {cfg.logit_temperature:g}")
    return " ".join(parts)


def heldout_stats(
    model: str,
    heldout: Path,
    max_seq_len: int,
    device: str,
    per_example: bool = False,
    batch: int = 1,
) -> dict[str, Any]:
    """Token-level NLL, accuracy and mean confidence of ``model`` on the held-out SFT slice.

    Plain cross-entropy (eps = 0, no temperature or softcap) on the assistant tokens of the
    held-out records, formatted exactly as for training; token-mean over all of them.
    ``overconfidence`` = mean confidence - accuracy. With ``per_example``, ``per_example``
    holds each example's token count and sums (nll, confidence, accuracy, entropy), in file
    order, for a paired bootstrap over examples. ``batch`` examples (sorted by length, right
    padded) share one decoder forward and each is then scored on its own rows of the hidden
    states, so a row's sums are those of its own forward up to the kernels' rounding; with
    ``batch = 1`` every example is its own forward. Without ``per_example`` the pooled sums
    come from batches of 8. A progress bar counts the examples.
    """
    import torch
    from tqdm.auto import tqdm

    from calibrated_lm.models import patch_model
    from calibrated_lm.models.loading import load_model
    from calibrated_lm.models.patching import fused_lm_loss, patch_config
    from calibrated_lm.training.batching import collate
    from calibrated_lm.training.data import load_dataset

    if batch < 1:
        raise ValueError(f"heldout_stats: batch must be >= 1, got {batch}")
    model_obj, tok = load_model(model, dtype="float32", device=device)
    patch_model(model_obj, label_smoothing=0.0)
    cfg, head = patch_config(model_obj), model_obj.get_output_embeddings()
    data = load_dataset(heldout, tok, max_seq_len=max_seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    dev = next(model_obj.parameters()).device
    sums = {"loss": 0.0, "confidence": 0.0, "accuracy": 0.0, "entropy": 0.0, "n": 0}
    keys = ("n", "nll", "confidence", "accuracy", "entropy")
    rows: dict[str, list[float]] = {k: [0.0] * len(data.examples) for k in keys}
    # Sorted by length so that a batch pads little; per-example rows go back to file order.
    order = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i].input_ids))
    step = batch if per_example else 8

    def add(loss: torch.Tensor, st: Any, index: int | None) -> None:
        sums["loss"] += float(loss)
        for k in ("confidence", "accuracy", "entropy"):
            sums[k] += getattr(st, k) * st.n_tokens
        sums["n"] += st.n_tokens
        if index is not None:
            rows["n"][index] = st.n_tokens
            rows["nll"][index] = float(loss)
            for k in ("confidence", "accuracy", "entropy"):
                rows[k][index] = getattr(st, k) * st.n_tokens

    bar = tqdm(total=len(order), desc="held-out", unit="ex", mininterval=10)
    with torch.no_grad():
        for i in range(0, len(order), step):
            chunk = order[i : i + step]
            b = {k: v.to(dev) for k, v in collate([data.examples[j] for j in chunk], pad).items()}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                if not per_example or len(chunk) == 1:
                    out = model_obj(**b, calibrated_lm_reduction="sum", calibrated_lm_stats=True)
                    add(out.loss, out.loss_stats, chunk[0] if per_example else None)
                else:
                    # One decoder forward, then each example's own rows through the same loss
                    # as the patched forward (right padding leaves a row's causal prefix alone).
                    mask = b["attention_mask"]
                    hidden = model_obj.base_model(
                        input_ids=b["input_ids"], attention_mask=mask
                    ).last_hidden_state
                    for r, j in enumerate(chunk):
                        n = int(mask[r].sum())
                        loss, st = fused_lm_loss(
                            hidden[r : r + 1, :n],
                            head,
                            cfg,
                            labels=b["labels"][r : r + 1, :n],
                            reduction="sum",
                            return_stats=True,
                        )
                        add(loss, st, j)
            bar.update(len(chunk))
    bar.close()
    n_tok = max(sums["n"], 1)
    res = {
        "nll": sums["loss"] / n_tok,
        "accuracy": sums["accuracy"] / n_tok,
        "mean_confidence": sums["confidence"] / n_tok,
        "entropy": sums["entropy"] / n_tok,
        "tokens": sums["n"],
        "examples": len(order),
    }
    res["overconfidence"] = res["mean_confidence"] - res["accuracy"]
    if per_example:
        res["per_example"] = rows
    del model_obj
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------------
# Running


def _timing_key(unit: Unit) -> str:
    """Units timed together: evaluations per scoring format (a trained-format one scores the
    secondary tasks too and takes ~4x a plain one), the rest per kind."""
    parts = unit.name.split("/")
    return f"{unit.kind}:{parts[2]}" if unit.kind == "eval" and len(parts) == 3 else unit.kind


# A resumed chunk's time outside its steps (load, final save, held-out pass) when no finished
# run in the work folder was timed the same way: the two-worker figure (claim 2's last chunks
# on the H200 spent 71-131 s after their training ended, session 13's ~120 s). Alone on an
# H100, claim 3's runs spent 12-40 s after it, and session 22's resumed last chunk 61 s
# outside its 11 steps in all.
TRAIN_TAIL_S = 130.0


def _checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The state (``step``, ``total_steps``, ...) of a run's latest checkpoint, or None where
    it has none or its state does not read."""
    from calibrated_lm.training.checkpoint import STATE_FILE, list_checkpoints

    found = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not found:
        return None
    try:
        state = json.loads((found[-1] / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _checkpoint_step(run_dir: Path) -> int | None:
    """The step of a run's latest checkpoint, or None where it has none."""
    state = _checkpoint_state(run_dir)
    try:
        return None if state is None else int(state["step"])
    except (KeyError, TypeError, ValueError):
        return None


def _step_times(run_dir: Path) -> list[tuple[int | None, float]]:
    """``(step, step_s)`` of each line of a run's ``metrics.jsonl`` that logs ``step_s``; none
    where the file does not read."""
    from calibrated_lm.training.loop import METRICS_FILE

    try:
        lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out: list[tuple[int | None, float]] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the kill that ended the chunk
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step_s"), (int, float)):
            step = rec.get("step")
            out.append((step if isinstance(step, int) else None, float(rec["step_s"])))
    return out


def _step_seconds(run_dir: Path, after: int) -> float:
    """Sum of ``step_s`` over the steps after ``after`` in a run's ``metrics.jsonl``."""
    return sum(t for step, t in _step_times(run_dir) if step is not None and step > after)


def _resume_estimate(unit: Unit, overhead_s: float | None = None) -> float | None:
    """Seconds a begun training unit needs to finish, or None where its files do not say.

    ``1.1 * ((total_steps - step) * q90(step_s) + overhead)``: ``step`` and
    ``total_steps`` from its latest checkpoint's state, ``q90`` the 90th percentile of the
    step times in its own ``metrics.jsonl``. A high quantile rather than the median: a run
    logged while the other worker sat idle (~1.0 s a step in session 14) resumes beside a
    training one (~1.6 s). ``overhead``: ``overhead_s`` (the largest a finished run's last
    chunk spent outside its steps, on a GPU shared the same way), else ``TRAIN_TAIL_S``. A run
    logged before ``step_s`` was recorded gives None.
    """
    import statistics

    state = _checkpoint_state(unit.folder)
    if state is None:
        return None
    try:
        step, total = int(state["step"]), int(state["total_steps"])
    except (KeyError, TypeError, ValueError):
        return None
    times = [t for _, t in _step_times(unit.folder)]
    if not times:
        return None
    q90 = statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0]
    overhead = TRAIN_TAIL_S if overhead_s is None else overhead_s
    return 1.1 * (max(total - step, 0) * q90 + overhead)


def _overhead_key(shared_gpu: bool) -> str:
    return f"train_overhead/{'shared' if shared_gpu else 'alone'}"


def _estimate(
    unit: Unit, timed: dict[str, list[float]], profile: Profile, shared_gpu: bool = False
) -> float:
    # A begun run needs what is left of it, which its own checkpoint and log tell: the
    # profile's whole-run figure made a session's last chunk pass over a run 48 steps from
    # its end (session 14, claim 3). Otherwise the profile's whole-run figure, never past
    # runs' timings: a training unit's unit_s is only its last chunk's time.
    if unit.kind == "train":
        seen = timed.get(_overhead_key(shared_gpu))
        left = None if unit.done() else _resume_estimate(unit, max(seen) if seen else None)
        if left is not None:
            return left
        whole = profile.est.get("train", 60) if shared_gpu else profile.est.get("train_alone")
        return float(whole if whole is not None else profile.est.get("train", 60))
    key = _timing_key(unit)
    # Scored like a trained-format unit (the same tasks and template), so timed like one.
    like = key.replace(APPLIED, "trained") if key.endswith(APPLIED) else key
    seen = timed.get(key) or timed.get(like) or timed.get(unit.kind)
    if seen:  # the latest few: earlier units may have run under other settings
        return max(seen[-3:]) * 1.1
    return float(profile.est.get(unit.kind, 60))


def _past_timings(units: list[Unit]) -> dict[str, list[float]]:
    """Seconds of finished units, under both their kind and their :func:`_timing_key`; and
    the time finished training units spent outside their steps in their last chunk, under
    :func:`_overhead_key` (only those that recorded whether the GPU was shared)."""
    timed: dict[str, list[float]] = {}
    for u in units:
        if u.done():
            d = read_json(u.folder / DONE)
            if "unit_s" in d:
                for key in {u.kind, _timing_key(u)}:
                    timed.setdefault(key, []).append(d["unit_s"])
            if isinstance(d.get("overhead_s"), (int, float)) and isinstance(
                d.get("shared_gpu"), bool
            ):
                timed.setdefault(_overhead_key(d["shared_gpu"]), []).append(d["overhead_s"])
    return timed


def plan(exp: Experiment, limit_s: float | None) -> None:
    """Print every unit, whether it is done, its estimate, and the chunk it would run in."""
    units = exp.units()
    timed = _past_timings(units)
    chunk, used, total = 1, 0.0, 0.0
    print(f"{'unit':48s} {'status':8s} {'est s':>6s}  chunk")
    for u in units:
        if u.done():
            print(f"{u.name:48s} {'done':8s} {'':>6s}")
            continue
        est = _estimate(u, timed, exp.p, exp.shared_gpu)
        if limit_s is not None and used + est > limit_s and used > 0:
            chunk, used = chunk + 1, 0.0
        used += est
        total += est
        print(f"{u.name:48s} {'pending':8s} {est:6.0f}  {chunk}")
    print(
        f"pending: ~{total:.0f} s"
        + (f" in {chunk} chunk(s) of <= {limit_s:.0f} s" if limit_s else "")
    )


class UnitLock:
    """An exclusive, non-blocking lock on one unit, so concurrent workers on one ``--work``
    folder never run the same unit. ``flock`` locks die with their process, so a worker killed
    by the chunk's time limit leaves no stale lock behind."""

    def __init__(self, work: Path, name: str) -> None:
        self.path = work / "locks" / (name.replace("/", "__") + ".lock")
        self.fd: int | None = None

    def acquire(self) -> bool:
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def held_elsewhere(self) -> bool:
        """Whether another live process holds this unit now."""
        if self.acquire():
            self.release()
            return False
        return True


# Seconds a checkpointed training unit needs left in the chunk to be worth starting.
MIN_TRAIN_START_S = 120.0


def _started(unit: Unit) -> bool:
    """A training unit with a checkpoint to resume from (an earlier chunk began it).

    Only a ``step-N`` folder with its state file counts: a chunk killed while writing its
    first checkpoint leaves just a temporary folder, which ``--resume`` skips, so that run
    would start from step 0 and must wait for a chunk that may begin new training.
    """
    from calibrated_lm.training.checkpoint import list_checkpoints

    return bool(list_checkpoints(unit.folder))


def run_units(
    exp: Experiment, limit_s: float | None, poll_s: float = 5.0, new_training: bool = True
) -> int:
    """Run pending units until done or the time limit; return the count left.

    ``new_training=False`` (a session's last chunk) starts no training unit that has no
    checkpoint yet: the machine goes back after the chunk, and a run begun now would be lost
    with it. Begun ones resume and finish, the evaluations run, and the workers stop when only
    unstarted trainings are left, so the chunk ends early instead of spending device time.

    Several workers may share one ``--work`` folder (two processes on one GPU, which one 270M
    model leaves partly idle; docs/results.md has the GPU use measured): each takes the first
    pending unit whose inputs are done and that no other worker holds (:class:`UnitLock`). A
    worker whose only pending units wait on units another worker is running polls every
    ``poll_s`` seconds. A unit that would pass the time limit is passed over for a shorter one
    that fits. The worker stops when nothing is left, when nothing can make progress, or when no
    runnable unit fits the time left.
    """
    clock = Clock(limit_s)
    told: set[str] = set()
    while True:
        units = exp.units()  # rebuilt every pass: the SFT units appear once the lr is selected
        timed = _past_timings(units)
        ran = busy_elsewhere = False
        for u in units:
            if u.done() or u.folder.name == "pending":
                continue
            if any(not _done_by_name(units, n) for n in u.needs):
                continue
            if not new_training and u.kind == "train" and not _started(u):
                if u.name not in told:
                    print(
                        f"[skip] {u.name}: not begun, and no new training in this chunk", flush=True
                    )
                    told.add(u.name)
                continue
            lock = UnitLock(exp.work, u.name)
            if not lock.acquire():
                busy_elsewhere = True
                continue
            try:
                if u.done():  # finished by another worker between our checks
                    continue
                est = _estimate(u, timed, exp.p, exp.shared_gpu)
                # A checkpointed training run may start when it cannot finish: the chunk's
                # timeout stops it and the next chunk resumes from its last checkpoint.
                # Not in a session's last chunk: a resume stopped there is lost with the
                # machine (bundles carry no checkpoints), so it must fit whole (est is what
                # is left of the run), and so must the units that need its weights (its
                # evaluations), which go with the machine too.
                chunkable = u.kind == "train" and exp.p.save_every > 0 and new_training
                if u.kind == "train" and not new_training:
                    est += sum(
                        _estimate(e, timed, exp.p, exp.shared_gpu)
                        for e in units
                        if u.name in e.needs and not e.done()
                    )
                if not clock.fits(min(est, MIN_TRAIN_START_S) if chunkable else est):
                    # A shorter unit further down (a training run rather than an evaluation)
                    # may still fit the time left.
                    if u.name not in told:
                        print(
                            f"[wait] {u.name} (~{est:.0f} s) would pass the {limit_s:.0f} s "
                            f"limit at {clock.elapsed():.0f} s; rerun to continue",
                            flush=True,
                        )
                        told.add(u.name)
                    continue
                print(f"[unit] {u.name} (est {est:.0f} s, at {clock.elapsed():.0f} s)", flush=True)
                t0 = time.monotonic()
                try:
                    result = u.action()
                except TrainingStopped as exc:
                    # The chunk's timeout (SIGTERM): the run checkpointed this step; the next
                    # chunk resumes it. Nothing else starts in a process being stopped.
                    print(f"[stopped] {u.name}: {exc}", flush=True)
                    return sum(not x.done() for x in exp.units())
                dt = time.monotonic() - t0
                result["unit_s"] = round(dt, 1)
                write_json(u.folder / DONE, result)
                print(f"[done] {u.name} in {dt:.0f} s", flush=True)
                ran = True
                break  # re-plan: the unit list or the estimates may have changed
            finally:
                lock.release()
        if ran:
            continue
        # Another worker may have finished a unit during this pass, unblocking one this pass
        # skipped or (select_lr) adding new ones: look again before waiting or stopping.
        units = exp.units()
        pending = [u for u in units if not u.done() and u.folder.name != "pending"]
        if any(
            u.name not in told
            and all(_done_by_name(units, n) for n in u.needs)
            and not UnitLock(exp.work, u.name).held_elsewhere()
            for u in pending
        ):
            continue
        busy_elsewhere = busy_elsewhere or any(
            UnitLock(exp.work, u.name).held_elsewhere() for u in pending
        )
        if not busy_elsewhere or not clock.fits(poll_s):
            break  # nothing runnable and nobody else working: the rest cannot start
        time.sleep(poll_s)
    units = exp.units()
    left = [u.name for u in units if not u.done()]
    print(f"finished units: {sum(u.done() for u in units)}, left: {len(left)}")
    for u in units:
        if not u.done():
            waits = [n for n in u.needs if not _done_by_name(units, n)]
            why = f" (waits for {', '.join(waits)})" if waits else ""
            print(f"  left: {u.name}{why}")
    return len(left)


def _check_profile(work: Path, profile: str) -> None:
    """Pin the work folder to one profile: mixing profiles would mix protocols."""
    path = work / "profile.json"
    if path.exists():
        old = read_json(path)["profile"]
        if old != profile:
            raise SystemExit(
                f"error: {work} holds a {old!r} run; use another --work for profile {profile!r}"
            )
    else:
        write_json(path, {"profile": profile})


def _cap_gpu_memory(fraction: float, device: str) -> None:
    """Cap this process' CUDA allocations, so a worker that runs out of memory does so in its
    own share (an automatic evaluation batch then halves) instead of starving its neighbour."""
    import torch

    if not 0 < fraction <= 1:
        raise SystemExit(f"error: --gpu-memory-fraction must be in (0, 1], got {fraction}")
    if torch.cuda.is_available():
        dev = torch.device(device if device.startswith("cuda") else "cuda")
        if dev.index is None:  # torch 2.11 wants an index here
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_per_process_memory_fraction(fraction, dev)


def _done_by_name(units: list[Unit], name: str) -> bool:
    return any(u.name == name and u.done() for u in units)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the experiment's units")
    r.add_argument("--profile", choices=sorted(PROFILES), default="budget")
    r.add_argument("--data", type=Path, nargs="*", default=[], help="instruction JSON files")
    r.add_argument("--work", type=Path, default=DEFAULT_WORK)
    r.add_argument("--device", default="auto")
    r.add_argument("--time-limit", type=float, default=None, help="seconds for this chunk")
    r.add_argument("--plan", action="store_true", help="print the units and chunks, run nothing")
    r.add_argument("--compile", action="store_true", help="train with the decoder layers compiled")
    r.add_argument(
        "--no-new-training",
        action="store_true",
        help="start no training unit that has no checkpoint yet (a session's last chunk)",
    )
    r.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=None,
        help="cap this process' share of GPU memory (for several workers on one GPU)",
    )
    b = sub.add_parser("bundle", help="pack the small results for transport")
    b.add_argument("--work", type=Path, default=DEFAULT_WORK)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument(
        "--newer-than",
        type=Path,
        default=None,
        help="only files modified after this file was (e.g. a marker of restored results)",
    )
    b.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="only these folders of --work (finished units to restore elsewhere, e.g. the "
        "control's eps-0 run and the base evaluations into a claim2 work folder)",
    )
    u = sub.add_parser("unbundle", help="unpack a bundle into the work folder")
    u.add_argument("archive", type=Path)
    u.add_argument("--work", type=Path, default=DEFAULT_WORK)
    rep = sub.add_parser("report", help="tables, overlaid diagrams and curves from the work folder")
    rep.add_argument("--work", type=Path, default=DEFAULT_WORK)
    rep.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    rep.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)

    if args.cmd == "run":
        exp = Experiment(
            PROFILES[args.profile], args.work, list(args.data), args.device, args.compile
        )
        if args.plan:
            plan(exp, args.time_limit)
            return 0
        _check_profile(args.work, args.profile)
        if args.gpu_memory_fraction is not None:
            _cap_gpu_memory(args.gpu_memory_fraction, args.device)
            exp.shared_gpu = args.gpu_memory_fraction < 1
        run_units(exp, args.time_limit, new_training=not args.no_new_training)
        return 0
    if args.cmd == "bundle":
        since = args.newer_than.stat().st_mtime if args.newer_than else None
        names = bundle(args.work, args.out, newer_than=since, only=args.only)
        print(f"bundled {len(names)} files into {args.out} ({args.out.stat().st_size} bytes)")
        return 0
    if args.cmd == "unbundle":
        names = unbundle(args.archive, args.work)
        print(f"unpacked {len(names)} files into {args.work}")
        return 0
    if args.cmd == "report":
        from sft_report import write_report

        write_report(args.work, args.results, bootstrap=args.bootstrap)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
