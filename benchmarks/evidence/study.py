"""PaCA vs LoRA vs full fine-tuning vs head-only, from paca's shipped pretrained models.

    python benchmarks/evidence/study.py vit           # one study (cnn, vit, llama), ~5-25 min
    python benchmarks/evidence/study.py all           # the three, then the report files
    python benchmarks/evidence/study.py vit --methods paca-r8 --lrs 1e-3 --seeds 0 --steps 5 \
        --out /tmp/cell                               # one reduced cell (what the tests run)

Studies (the model is pretrained by ``pretrain.py``; fine-tuning moves to a shifted task):

- ``cnn``: ``paca.tiny/digits-cnn`` (pretrained on digits 0-4) -> digits 5-9 with a new
  head (``modules_to_save``); PaCA/LoRA on the Conv2d layers conv2-conv4.
- ``vit``: ``paca.tiny/digits-vit`` -> digits 5-9, new head; PaCA/LoRA on every linear
  layer of the encoder (q, k, v, o, fc1, fc2).
- ``llama``: ``paca.tiny/code-llama`` (pretrained on the standard library's source) ->
  Python's documentation text; PaCA/LoRA on q, k, v, o, gate, up, down.

Methods: ``frozen`` (no training: the pretrained model as is), ``head`` (only the
head trains: the linear probe; for the LM the LM head), ``paca-rR`` at three r,
``lora-rK`` at the same r and at the rank whose trainable-parameter count is closest
to each PaCA r, ``full`` (every parameter) and ``scratch`` (full training from random
init: what the pretraining is worth). Methods are built by the same code as ``paca
run`` (:func:`paca.experiment.methods.prepare`), on the same data rows (the
``paca.data/...`` sources).

Protocol: every trained method gets the same learning-rate grid (``LRS``), run with
seed 0 and scored on the validation split; the best learning rate is then run with
seeds 0, 1, 2 and scored on the test split (mean +- std). Same steps, batch, schedule
(5% warm-up, cosine), AdamW, gradient clipping for every method. Every run times its
steps (forward + backward + optimizer step, median after warm-up) and probes the peak
memory of one training step (parameters, gradients, optimizer state and every tensor
the step allocates; ``paca.bench.memory.AllocationTracker``, since CPUs have no
allocator counter), so accuracy, time and memory come from the same runs. Runs go
round-robin over methods, so machine load drifts over all of them alike. Results are
appended to ``OUT/STUDY.jsonl`` (a rerun skips finished runs), and the report is
``OUT/STUDY.md`` (tables) and ``OUT/STUDY.png`` (convergence curves, time, memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    batches,
    digits_tensors,
    environment,
    evaluate_classifier,
    evaluate_lm,
    lr_at,
    text_tensors,
)

OUT = Path(__file__).resolve().parent / "results"
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (0, 1, 2)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE_STEP = 3  # the step whose memory is probed (optimizer state exists by then)
WARMUP_STEPS = 5  # steps left out of the step-time median


@dataclass
class Study:
    name: str
    model: str  # paca.tiny name
    task: str  # "image" or "lm"
    data: str  # paca.data name of the shifted task
    targets: list[str] | str
    head: str
    ranks: tuple[int, ...]
    steps: int
    batch_size: int
    eval_every: int
    exclude: list[str] = field(default_factory=list)
    seq_len: int = 128
    eval_limit: int = 0  # LM: validation chunks for the convergence curve (0 = all)
    title: str = ""
    lrs: tuple[float, ...] = LRS  # the learning-rate grid, the same for every method
    timing_rounds: int = 100  # rounds of the interleaved step timing
    max_lr: float = 3e-2  # a method whose best LR is the grid's largest also tries x3, up to this


STUDIES = {
    "cnn": Study(
        "cnn", "digits-cnn", "image", "digits:5-9", ["conv2", "conv3", "conv4"], "classifier",
        ranks=(2, 4, 8), steps=300, batch_size=32, eval_every=25,
        title="CNN (4 Conv2d), digits 0-4 -> 5-9",
    ),
    "vit": Study(
        "vit", "digits-vit", "image", "digits:5-9", "all-linear", "classifier",
        ranks=(4, 8, 16), steps=300, batch_size=32, eval_every=25, exclude=["classifier"],
        title="ViT (4 layers, hidden 64), digits 0-4 -> 5-9",
    ),
    "llama": Study(
        "llama", "code-llama", "lm", "python-docs", LLAMA_TARGETS, "lm_head",
        ranks=(8, 16, 32), steps=200, batch_size=8, eval_every=25, eval_limit=256,
        title="LLaMA (3 layers, hidden 96), stdlib code -> Python docs", lrs=(1e-3, 3e-3, 1e-2),
    ),
}  # fmt: skip


# --------------------------------------------------------------------- methods
def build_model(study: Study, seed: int, pretrained: bool = True) -> torch.nn.Module:
    from paca.tiny import load_pretrained

    if study.task == "image":
        return load_pretrained(study.model, seed=seed, new_head=True, pretrained=pretrained)
    return load_pretrained(study.model, seed=seed, pretrained=pretrained)


def _section(study: Study, name: str, r: int = 8) -> Any:
    from paca.experiment.schema import MethodSection

    return MethodSection(
        name=name, r=r, target_modules=study.targets, exclude_modules=list(study.exclude),
        modules_to_save=[study.head] if study.task == "image" else [],
    )  # fmt: skip


def prepare_method(study: Study, method: str, seed: int) -> tuple[torch.nn.Module, int, int, bool]:
    """``(model, trainable, total, trains)`` for ``method`` (``paca-r8``, ``lora-r4``, ...)."""
    import paca
    from paca.experiment.methods import prepare

    backend = paca.get_backend()
    kind, _, rank = method.partition("-r")
    model = build_model(study, seed, pretrained=method != "scratch")
    if kind in ("paca", "lora"):
        p = prepare(model, _section(study, kind, int(rank)), seed, backend)
    elif kind in ("full", "scratch", "frozen"):
        p = prepare(model, _section(study, "frozen" if kind == "frozen" else "full"), seed, backend)
    elif kind == "head":
        model.requires_grad_(False)
        getattr(model, study.head).requires_grad_(True)
        trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        return model, trainable, sum(q.numel() for q in model.parameters()), True
    else:
        raise ValueError(f"unknown method {method!r}")
    return p.model, p.trainable, p.total, p.trains


def lora_params(study: Study, rank: int) -> int:
    import paca
    from paca.experiment.methods import prepare

    model = build_model(study, 0)
    return prepare(model, _section(study, "lora", rank), 0, paca.get_backend()).trainable


def method_list(study: Study) -> tuple[list[str], dict[str, str]]:
    """The methods of ``study`` and, for each LoRA rank, why it is there.

    LoRA's trainable count is linear in its rank (``base + k * per_rank``, ``base`` being
    the new head); the matched rank is the one closest to PaCA's count, unless a same-r
    rank is already within 10% of it.
    """
    import paca

    paca.use_backend("cpu")
    one, two = lora_params(study, 1), lora_params(study, 2)
    per_rank = two - one
    base = one - per_rank

    def count(k: int) -> int:
        return base + k * per_rank

    notes: dict[str, list[str]] = {f"lora-r{r}": [f"same r as paca-r{r}"] for r in study.ranks}
    for r in study.ranks:
        _, target, _, _ = prepare_method(study, f"paca-r{r}", 0)
        k = max(1, round((target - base) / per_rank))
        near = min(study.ranks, key=lambda q: abs(count(q) - target))
        if abs(count(near) - target) <= 0.1 * target:
            k = near
        notes.setdefault(f"lora-r{k}", []).append(f"matched to paca-r{r}")
    ranks = sorted(int(name.split("-r")[1]) for name in notes)
    methods = ["frozen", "head", *(f"paca-r{r}" for r in study.ranks)]
    methods += [f"lora-r{k}" for k in ranks] + ["full", "scratch"]
    return methods, {name: "; ".join(v) for name, v in notes.items()}


# ----------------------------------------------------------------------- data
def load_data(study: Study) -> dict[str, Any]:
    if study.task == "image":
        spec = study.data.split(":", 1)[1]
        return {s: digits_tensors(spec, s) for s in ("train", "val", "test")}
    data = {s: text_tensors(study.data, s, study.seq_len) for s in ("train", "val", "test")}
    data["curve"] = {k: v[: study.eval_limit] for k, v in data["val"].items()}
    data["source_test"] = text_tensors("python-code", "test", study.seq_len, limit=256)
    return data


def _evaluate(study: Study, model: torch.nn.Module, split: Any) -> dict[str, float]:
    if study.task == "image":
        return evaluate_classifier(model, *split)
    return evaluate_lm(model, split)


def _batch(study: Study, data: dict[str, Any], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    if study.task == "image":
        x, y = data["train"]
        return {"pixel_values": x[idx], "labels": y[idx]}
    return {k: v[idx] for k, v in data["train"].items()}


def _n_train(study: Study, data: dict[str, Any]) -> int:
    train = data["train"]
    return len(train[1]) if study.task == "image" else train["input_ids"].shape[0]


# -------------------------------------------------------------------- one run
def probe_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: Any) -> dict[str, int]:
    """Peak bytes of one training step: static tensors + everything the step allocates."""
    from paca.bench.memory import (
        AllocationTracker,
        SavedActivationCounter,
        model_tensors,
        optimizer_state_bytes,
        unique_storage_bytes,
    )

    opt.zero_grad(set_to_none=True)
    gc.collect()
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    static = unique_storage_bytes(model_tensors(model) + state)
    counter = SavedActivationCounter(model_tensors(model), {})
    tracker = AllocationTracker()
    with tracker:
        with counter.count():
            loss = step()
        loss.backward()
        del loss
        opt.step()
    return {
        "peak_bytes": static + tracker.peak,
        "static_bytes": static,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "saved_activation_bytes": counter.total_bytes,
    }


def run_one(
    study: Study, method: str, lr: float, seed: int, data: dict[str, Any], phase: str,
    steps: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune once; returns the record of the run (metrics, curve, time, memory)."""
    import paca

    paca.use_backend("cpu")
    torch.manual_seed(seed)
    steps = steps or study.steps
    model, trainable, total, trains = prepare_method(study, method, seed)
    curve_split = data["curve"] if study.task == "lm" else data["val"]
    record: dict[str, Any] = {
        "study": study.name, "method": method, "lr": lr, "seed": seed, "phase": phase,
        "steps": steps, "trainable_params": trainable, "total_params": total, "curve": [],
    }  # fmt: skip
    record["curve"].append({"step": 0, **_evaluate(study, model, curve_split)})
    step_times: list[float] = []
    if trains:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 20)
        order = batches(_n_train(study, data), study.batch_size, steps, seed)
        model.train()
        for i, idx in enumerate(order):
            for g in opt.param_groups:
                g["lr"] = lr * lr_at(i, steps, warmup, "cosine")
            batch = _batch(study, data, idx)

            def step(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
                return model(**batch).loss

            if i == PROBE_STEP:
                record["memory"] = probe_step(model, opt, step)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            else:
                gc.disable()
                t0 = time.perf_counter()
                loss = step()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - t0
                gc.enable()
                if i >= WARMUP_STEPS:
                    step_times.append(elapsed)
                if not math.isfinite(loss.item()):
                    record["diverged_at"] = i
                    break
            if (i + 1) % study.eval_every == 0 or i + 1 == steps:
                record["curve"].append({"step": i + 1, **_evaluate(study, model, curve_split)})
                model.train()
    model.eval()
    record["val"] = _evaluate(study, model, data["val"])
    record["test"] = _evaluate(study, model, data["test"])
    if study.task == "lm":
        record["source_test"] = _evaluate(study, model, data["source_test"])
    if step_times:
        record["step_time_median_s"] = statistics.median(step_times)
        record["measured_steps"] = len(step_times)
    return record


def time_interleaved(
    study: Study, methods: list[str], data: dict[str, Any], rounds: int = 40, warmup: int = 5,
    lrs: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Step times of every method measured round-robin in one process, so load hits all alike.

    Each run's own median (``step_time_median_s``) is taken minutes apart from the other
    methods' on a shared machine; here round ``k`` steps every method once (the order
    rotates each round), with the same batches, after ``warmup`` rounds. Returns per
    method the median, quartiles and number of timed steps.
    """
    import paca

    paca.use_backend("cpu")
    setups = []
    for m in methods:
        model, _, _, trains = prepare_method(study, m, 0)
        if not trains:
            continue
        params = [p for p in model.parameters() if p.requires_grad]
        lr = (lrs or {}).get(m, 1e-3)
        setups.append((m, model.train(), params, torch.optim.AdamW(params, lr=lr)))
    order = batches(_n_train(study, data), study.batch_size, warmup + rounds, 0)
    times: dict[str, list[float]] = {m: [] for m, *_ in setups}
    for k, idx in enumerate(order):
        batch = _batch(study, data, idx)
        gc.collect()
        for j in range(len(setups)):
            m, model, params, opt = setups[(k + j) % len(setups)]
            gc.disable()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            gc.enable()
            if k >= warmup:
                times[m].append(elapsed)
    out = {}
    for m, xs in times.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        out[m] = {"median_s": statistics.median(xs), "q1_s": q[0], "q3_s": q[2], "n": len(xs)}
    return out


# ----------------------------------------------------------------- the protocol
def _key(r: dict[str, Any]) -> tuple:
    return (r["method"], r["lr"], r["seed"], r["phase"], r["steps"])


def _score(study: Study, r: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: (val accuracy, -val loss) for images; (-val loss, 0) for the LM."""
    v = r["val"]
    if not math.isfinite(v["loss"]):
        return (-math.inf, -math.inf)
    return (v["accuracy"], -v["loss"]) if study.task == "image" else (-v["loss"], 0.0)


def best_lrs(study: Study, records: list[dict[str, Any]]) -> dict[str, float]:
    best: dict[str, tuple[tuple[float, float], float]] = {}
    for r in records:
        if r["phase"] != "sweep":
            continue
        s = _score(study, r)
        if r["method"] not in best or s > best[r["method"]][0]:
            best[r["method"]] = (s, r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


def run_study(
    study: Study, out: Path, methods: list[str] | None = None, lrs: tuple[float, ...] | None = None,
    seeds: tuple[int, ...] = SEEDS, steps: int | None = None, threads: int = 1,
    timing_rounds: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The sweep (seed ``seeds[0]``, every LR) then the seeds at each method's best LR."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{study.name}.jsonl"
    records = (
        [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    )
    done = {_key(r) for r in records}
    all_methods, notes = method_list(study)
    methods = methods or all_methods
    lrs = lrs or study.lrs
    data = load_data(study)
    steps = steps or study.steps

    def do(method: str, lr: float, seed: int, phase: str) -> None:
        key = (method, lr, seed, phase, steps)
        if key in done:
            return
        t0 = time.perf_counter()
        rec = run_one(study, method, lr, seed, data, phase, steps)
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        rec["note"] = notes.get(method, "")
        records.append(rec)
        done.add(key)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        metric = rec["test"]["accuracy"] if study.task == "image" else rec["test"]["loss"]
        print(f"[{study.name}] {phase} {method} lr={lr:g} seed={seed}: test {metric:.4f} "
              f"val loss {rec['val']['loss']:.4f} ({rec['wall_s']:.1f}s)", flush=True)  # fmt: skip

    trained = [m for m in methods if m != "frozen"]
    if "frozen" in methods:
        for seed in seeds:
            do("frozen", 0.0, seed, "final")
    for lr in lrs:  # the sweep: one seed, every LR, round-robin over methods
        for m in trained:
            do(m, lr, seeds[0], "sweep")
    chosen = best_lrs(study, [r for r in records if r["steps"] == steps])
    # a best LR at the top of the grid is not an optimum: try the next one (x3), up to max_lr
    tried = {m: {r["lr"] for r in records if r["method"] == m and r["phase"] == "sweep"
                 and r["steps"] == steps} for m in trained}  # fmt: skip
    for m in trained:
        nxt = chosen[m] * 3
        if chosen[m] == max(tried[m]) and nxt <= study.max_lr * 1.001:
            do(m, float(f"{nxt:.3g}"), seeds[0], "sweep")
    chosen = best_lrs(study, [r for r in records if r["steps"] == steps])
    for seed in seeds:  # the final runs at the chosen LR
        for m in trained:
            if seed == seeds[0]:
                src = next(r for r in records if _key(r) == (m, chosen[m], seed, "sweep", steps))
                if (m, chosen[m], seed, "final", steps) not in done:
                    rec = dict(src, phase="final")
                    records.append(rec)
                    done.add(_key(rec))
                    with open(log, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec) + "\n")
                continue
            do(m, chosen[m], seed, "final")
    selected = [r for r in records if r["steps"] == steps and r["method"] in methods]
    timing_file = out / f"{study.name}.timing.json"
    print(f"[{study.name}] interleaved step timing of {len(methods) - 1} methods", flush=True)
    rounds = timing_rounds or study.timing_rounds
    timing = time_interleaved(study, methods, data, rounds=rounds, lrs=chosen)
    timing_file.write_text(
        json.dumps({"steps": steps, "rounds": rounds, "warmup_rounds": 5, "methods": timing},
                   indent=2) + "\n"
    )  # fmt: skip
    report(study, selected, out)
    return selected


# ---------------------------------------------------------------------- report
def _ms(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    study: Study, records: list[dict[str, Any]], timing: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Per method: chosen LR, test metric mean/std over seeds, step times, peak memory.

    ``step_s`` is the interleaved median (``timing``) when there is one, else the median of
    the runs' own medians (``run_step_s``, always kept).
    """
    rows: dict[str, dict[str, Any]] = {}
    chosen = best_lrs(study, records)  # finals at an LR an older, smaller sweep chose are stale
    for r in records:
        if r["phase"] != "final" or (r["method"] in chosen and r["lr"] != chosen[r["method"]]):
            continue
        row = rows.setdefault(r["method"], {"runs": []})
        row["runs"].append(r)
    for m, row in rows.items():
        runs = row["runs"]
        row["lr"] = runs[0]["lr"]
        row["trainable"] = runs[0]["trainable_params"]
        row["total"] = runs[0]["total_params"]
        row["note"] = runs[0].get("note", "")
        row["seeds"] = len(runs)
        row["acc"] = _ms([x["test"]["accuracy"] for x in runs])
        row["loss"] = _ms([x["test"]["loss"] for x in runs])
        if study.task == "lm":
            row["ppl"] = _ms([x["test"]["perplexity"] for x in runs])
            row["source_loss"] = _ms([x["source_test"]["loss"] for x in runs])
        times = [x["step_time_median_s"] for x in runs if "step_time_median_s" in x]
        row["run_step_s"] = statistics.median(times) if times else None
        row["step_s"] = row["run_step_s"]
        if timing and m in timing:
            row["step_s"] = timing[m]["median_s"]
            row["step_iqr"] = (timing[m]["q1_s"], timing[m]["q3_s"])
        peaks = [x["memory"]["peak_bytes"] for x in runs if "memory" in x]
        row["peak"] = statistics.median(peaks) if peaks else None
        saved = [x["memory"]["saved_activation_bytes"] for x in runs if "memory" in x]
        row["saved"] = statistics.median(saved) if saved else None
    return rows


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def sweep_table(study: Study, records: list[dict[str, Any]], methods: list[str]) -> str:
    sweep = [r for r in records if r["phase"] == "sweep"]
    lrs = sorted({r["lr"] for r in sweep})
    what = "val accuracy" if study.task == "image" else "val loss"
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---:|" * len(lrs)]  # fmt: skip
    chosen = best_lrs(study, records)
    for m in methods:
        cells = []
        for lr in lrs:
            r = next((x for x in sweep if x["method"] == m and x["lr"] == lr), None)
            if r is None:
                cells.append("")
                continue
            v = r["val"]["accuracy"] if study.task == "image" else r["val"]["loss"]
            text = f"{v:.4f}" if math.isfinite(v) else "diverged"
            cells.append(f"**{text}**" if chosen.get(m) == lr else text)
        if any(cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    note = (
        f"Learning-rate sweep (seed {SEEDS[0]}, {what}; bold = chosen; the same grid for every "
        f"method, and a method whose best was the grid's largest also ran x3 that, up to "
        f"{study.max_lr:g}; a blank was not run):"
    )
    return note + "\n\n" + "\n".join(lines)


def results_table(study: Study, rows: dict[str, dict[str, Any]], methods: list[str]) -> str:
    full = rows.get("full", {})
    if study.task == "image":
        head = "| method | trainable | lr | test accuracy (mean ± std) | test loss | step ms | vs full | in-run step ms | peak MiB | vs full | saved act. KiB |"
    else:
        head = "| method | trainable | lr | test loss (mean ± std) | perplexity | code loss (forgetting) | step ms | vs full | in-run step ms | peak MiB | vs full | saved act. KiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        if m not in rows:
            continue
        r = rows[m]
        step = f"{r['step_s'] * 1000:.2f}" if r["step_s"] else "-"
        run_step = f"{r['run_step_s'] * 1000:.1f}" if r["run_step_s"] else "-"
        peak = f"{r['peak'] / 2**20:.2f}" if r["peak"] else "-"
        saved = f"{r['saved'] / 1024:,.0f}" if r["saved"] is not None else "-"
        lr = f"{r['lr']:g}" if m != "frozen" else "-"
        name = m + (f" ({r['note']})" if r["note"] else "")
        t_ratio = _fmt_ratio(r["step_s"], full.get("step_s"))
        m_ratio = _fmt_ratio(r["peak"], full.get("peak"))
        if study.task == "image":
            acc = f"{r['acc'][0]:.4f} ± {r['acc'][1]:.4f}"
            loss = f"{r['loss'][0]:.3f}"
            lines.append(f"| {name} | {r['trainable']:,} | {lr} | {acc} | {loss} | {step} | {t_ratio} | {run_step} | {peak} | {m_ratio} | {saved} |")  # fmt: skip
        else:
            loss = f"{r['loss'][0]:.4f} ± {r['loss'][1]:.4f}"
            ppl = f"{r['ppl'][0]:.3f}"
            src = f"{r['source_loss'][0]:.3f}"
            lines.append(f"| {name} | {r['trainable']:,} | {lr} | {loss} | {ppl} | {src} | {step} | {t_ratio} | {run_step} | {peak} | {m_ratio} | {saved} |")  # fmt: skip
    return "\n".join(lines)


def pairs_table(study: Study, rows: dict[str, dict[str, Any]], notes: dict[str, str]) -> str:
    """PaCA r vs LoRA at the same r and at matched parameters: metric difference and ratios."""
    lines = ["| PaCA | vs LoRA | trainable ratio | metric difference | step-time ratio | peak-memory ratio | saved-activation ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in study.ranks:
        p = rows.get(f"paca-r{r}")
        if p is None:
            continue
        for lora, note in notes.items():
            if f"paca-r{r}" not in note or lora not in rows:
                continue
            q = rows[lora]
            if study.task == "image":
                diff = f"{(p['acc'][0] - q['acc'][0]) * 100:+.2f} pts accuracy"
            else:
                diff = f"{p['loss'][0] - q['loss'][0]:+.4f} loss"
            same, matched = f"same r as paca-r{r}" in note, f"matched to paca-r{r}" in note
            kind = "same r and matched" if same and matched else ("same r" if same else "matched")
            lines.append(
                f"| paca-r{r} | {lora} ({kind}) | {p['trainable'] / q['trainable']:.2f} | {diff} | "
                f"{_fmt_ratio(p['step_s'], q['step_s'])} | {_fmt_ratio(p['peak'], q['peak'])} | "
                f"{_fmt_ratio(p['saved'], q['saved'])} |"
            )
    return "\n".join(lines)


def plot(study: Study, records: list[dict[str, Any]], rows: dict[str, Any], methods: list[str], path: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "accuracy" if study.task == "image" else "loss"
    fig, (ax, ax_t, ax_m) = plt.subplots(
        1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [1.8, 1, 1]}, constrained_layout=True
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown = [m for m in methods if m in rows]
    for i, m in enumerate(shown):
        runs = rows[m]["runs"]
        steps = [c["step"] for c in runs[0]["curve"]]
        if m == "frozen" or len(steps) < 2:
            value = statistics.fmean(x["curve"][0][key] for x in runs)
            ax.axhline(value, color="grey", linestyle=":", label=f"{m} (no training)")
            continue
        vals = [[c[key] for c in x["curve"]] for x in runs if len(x["curve"]) == len(steps)]
        mean = [statistics.fmean(v) for v in zip(*vals, strict=True)]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*vals, strict=True)]
        style = "-" if m.startswith("paca") else ("--" if m.startswith("lora") else "-.")
        colour = colours[i % len(colours)]
        ax.plot(steps, mean, style, color=colour, label=f"{m} (lr {rows[m]['lr']:g})")
        ax.fill_between(steps, [a - b for a, b in zip(mean, std, strict=True)],
                        [a + b for a, b in zip(mean, std, strict=True)], color=colour, alpha=0.12)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {key}" + (" (LM: subset)" if study.task == "lm" else ""))
    if study.task == "lm":
        lo = min(min(c["loss"] for c in x["curve"]) for m in shown for x in rows[m]["runs"])
        hi = max(
            rows["frozen"]["runs"][0]["curve"][0]["loss"] if "frozen" in rows else lo + 1, lo + 0.2
        )
        ax.set_ylim(lo - 0.05, hi + 0.1)
    else:
        ax.set_ylim(0.0, 1.0)
    ax.set_title("convergence at each method's chosen lr (mean ± std over seeds)", fontsize=10)
    fig.suptitle(study.title)
    if study.task == "lm" and "scratch" in rows:
        ax.text(0.99, 0.99, "scratch starts at 5.6 and ends near 2.4: off the chart",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="grey")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    timed = [m for m in shown if rows[m]["step_s"]]
    base_t = rows.get("full", {}).get("step_s")
    base_m = rows.get("full", {}).get("peak")
    for axis, field_, scale, title, base in (
        (ax_t, "step_s", 1000.0, "median step time (ms)", base_t),
        (ax_m, "peak", 1 / 2**20, "peak memory of a step (MiB)", base_m),
    ):
        vals = [rows[m][field_] * scale for m in timed]
        bars = axis.bar(
            range(len(timed)), vals, color=[colours[shown.index(m) % len(colours)] for m in timed]
        )
        for bar, m in zip(bars, timed, strict=True):
            text = f"{bar.get_height():.2f}"
            if base:
                text += f"\n{rows[m][field_] / base:.2f}x"
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=6)  # fmt: skip
        axis.set_xticks(range(len(timed)), timed, rotation=60, fontsize=7)
        axis.set_title(title + " (ratio vs full)", fontsize=9)
        axis.margins(y=0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(study: Study, records: list[dict[str, Any]], out: Path) -> Path:
    """Write ``STUDY.md`` (sweep, results, PaCA-vs-LoRA pairs) and ``STUDY.png``."""
    methods, notes = method_list(study)
    methods = [m for m in methods if any(r["method"] == m for r in records)]
    timing_file = out / f"{study.name}.timing.json"
    timing_doc = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    timing = timing_doc.get("methods")
    rounds = timing_doc.get("rounds", study.timing_rounds)
    rows = aggregate(study, records, timing)
    steps = records[0]["steps"] if records else study.steps
    seeds = sorted({r["seed"] for r in records if r["phase"] == "final"})
    text = [
        f"## {study.title}",
        "",
        f"`paca.tiny/{study.model}` fine-tuned on `paca.data/{study.data}`: {steps} steps, "
        f"batch {study.batch_size}"
        + (f", {study.seq_len} tokens" if study.task == "lm" else "")
        + f", AdamW, 5% warm-up + cosine, clip 1.0; seeds {', '.join(map(str, seeds))} at the "
        f"chosen learning rate; test split. Step time (forward + backward + optimizer step, "
        f"1 CPU thread): *step ms* is the median of an interleaved timing pass (every method "
        f"stepped round-robin in one process, {rounds} rounds after 5 warm-up rounds, so machine "
        f"load hits all methods alike); *in-run step ms* is the median of the training runs' "
        f"own step times (after {WARMUP_STEPS} warm-up steps), taken minutes apart on a shared "
        f"machine, so noisier. Peak memory: one training step of each run, parameters + "
        f"gradients + optimizer state + every tensor the step allocates; saved act.: what "
        f"autograd keeps for backward.",
        "",
        results_table(study, rows, methods),
        "",
        "PaCA against LoRA (ratios PaCA / LoRA; metric difference PaCA - LoRA"
        + (", higher accuracy is better" if study.task == "image" else ", lower loss is better")
        + "):",
        "",
        pairs_table(study, rows, notes),
        "",
        sweep_table(study, records, methods),
        "",
    ]
    md = out / f"{study.name}.md"
    md.write_text("\n".join(text), encoding="utf-8")
    if rows:
        plot(study, records, rows, methods, out / f"{study.name}.png")
    (out / f"{study.name}.environment.json").write_text(
        json.dumps(environment(), indent=2) + "\n", encoding="utf-8"
    )
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=[*STUDIES, "all"])
    p.add_argument("--methods", nargs="+", default=None, help="a subset (e.g. paca-r8 lora-r4)")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="default: the study's grid")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--steps", type=int, default=None, help="fewer steps (smoke runs)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing-rounds", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the log")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in STUDIES if args.study == "all" else [args.study]:
        study = STUDIES[name]
        if args.report_only:
            log = args.out / f"{name}.jsonl"
            recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            steps = args.steps or study.steps
            report(study, [r for r in recs if r["steps"] == steps], args.out)
            continue
        lrs = tuple(args.lrs) if args.lrs else None
        run_study(study, args.out, args.methods, lrs, tuple(args.seeds), args.steps, args.threads,
                  args.timing_rounds)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
